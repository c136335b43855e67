"""JAX's persistent compilation cache (a second run of the same shapes loads its programs
instead of compiling them; on a GPU one train-step compile takes tens of seconds), and
:class:`RunClock`, which tells compile seconds apart from the rest of a run's wall time."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import jax

from mtl_jax.errors import MtlError


def default_cache_dir() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/mtl_jax/xla`` (``~/.cache/mtl_jax/xla``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtl_jax" / "xla"


def use_compile_cache(setting: str = "auto", min_compile_s: float = 0.0) -> Path | None:
    """Cache compiled programs in ``setting`` (a folder; ``auto``: :func:`default_cache_dir`), or not (``off``).

    Programs that took at least ``min_compile_s`` to compile are kept. Returns the folder in use.
    """
    if setting == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = default_cache_dir() if setting == "auto" else Path(setting).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MtlError(
            f"--compile-cache {folder}: cannot create the folder ({e.strerror}); pass another or 'off'"
        ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


# JAX's own monitoring events for the stages of turning a function into a program
# (tracing, lowering to MLIR, XLA compile or persistent-cache load).
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a program loaded instead of compiled


class RunClock:
    """A run's wall time by part: ``with clock.part("train"): ...``; parts may nest (time goes
    to the innermost).

    JAX's compile seconds (``COMPILE_EVENTS``, wherever they happen: the first step of a shape,
    the first evaluation) are taken out of the part they happened in and counted as
    ``compile``, so the parts add up to the wall time.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.compiled = 0.0
        self.programs = 0  # programs compiled or loaded from the persistent cache
        self.cache_hits = 0  # of those, loaded from the persistent cache
        self._stack: list[str] = []
        self._t0, self._c0 = self.start, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        jax.monitoring.register_event_listener(self._on_count)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.compiled += duration
            self.programs += event == COMPILE_EVENTS[-1]

    def _on_count(self, event: str, **_) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT

    @contextlib.contextmanager
    def part(self, name: str):
        self._flush()
        self._stack.append(name)
        try:
            yield
        finally:
            self._flush()
            self._stack.pop()

    def _flush(self) -> None:
        now, compiled = time.perf_counter(), self.compiled
        if self._stack:
            self._add("compile", compiled - self._c0)
            self._add(self._stack[-1], now - self._t0 - (compiled - self._c0))
        self._t0, self._c0 = now, compiled

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def breakdown(self) -> dict[str, float]:
        """Seconds per part, ``other`` (outside every part) and ``wall`` since the clock started."""
        self._flush()
        wall = time.perf_counter() - self.start
        parts = {k: round(v, 2) for k, v in self.seconds.items()}
        return parts | {"other": round(wall - sum(self.seconds.values()), 2), "wall": round(wall, 2)}

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)
        jax.monitoring.unregister_event_listener(self._on_count)
