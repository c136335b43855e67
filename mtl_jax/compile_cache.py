"""JAX's persistent compilation cache: a second run of the same shapes loads its programs
instead of compiling them (on a GPU one train-step compile takes tens of seconds)."""

from __future__ import annotations

import os
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
