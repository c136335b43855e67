"""Host memory on the CPU backend: keep the scratch block a compiled step frees for the next step.

XLA:CPU gives each call of a compiled function one block of scratch memory and frees it
when the call ends. glibc serves a block that large from the calling worker thread's own
arena with ``mmap`` and returns it with ``munmap``, so on every step the kernel faults in
and zeroes fresh pages. With every thread in the main arena, no ``mmap`` and a trim
threshold of 2 GiB, the freed block stays in the heap and the next step reuses it.

The price: freed memory up to 2 GiB stays with the process, and all threads share one
malloc arena, so compiling a shape takes a little longer. What it buys on the default run
and on one step is measured in docs/performance.md (``benchmarks/train_step.py --default-malloc``
is the A/B switch). Only glibc's ``mallopt`` is touched; elsewhere this is a no-op.
``MTL_JAX_MALLOC=default`` in the environment keeps glibc's defaults: a smaller peak (each step's
scratch is mapped for the call and given back), slower steps on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: at most 2 GiB stays with the process

_applied = False


def reuse_host_memory() -> bool:
    """Make freed host memory stay in the process for reuse; True when it takes effect.

    Call it before NumPy or JAX are imported: a thread that has already allocated (NumPy's
    BLAS starts one) keeps its own arena, glibc then hands later threads that arena or the main
    one in turn, and a big block in any arena but the main one is always mapped and unmapped.
    Importing :mod:`mtl_jax.commands` (every command-line program) calls it first thing; the
    benchmarks and tests call it before importing anything else.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("MTL_JAX_MALLOC", "").strip().lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    # no public way to ask whether JAX's backend has started; not imported, it has not
    xla_bridge = sys.modules.get("jax._src.xla_bridge")
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        log.info("reuse_host_memory: JAX has started its backend; call it before the first computation")
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    _applied = bool(
        mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    return _applied
