"""Host memory on the CPU backend: keep the scratch block a compiled step frees for the next step.

XLA:CPU gives each call of a compiled function one block of scratch memory and frees it
when the call ends: 630 MiB for a MiniLM train step at batch 32 x 64. glibc serves a block
that large from the calling worker thread's own arena with ``mmap`` and returns it with
``munmap``, so on every step the kernel faults in and zeroes 160,000 fresh pages: 0.3 s of
system time per step on 2 cores, 15% of the step's wall time. With every thread in the
main arena, no ``mmap`` and a trim threshold of 2 GiB, the freed block stays in the heap
and the next step reuses it (no page faults; ``benchmarks/train_step.py`` reports both).

The price: freed memory up to 2 GiB stays with the process (its resident size stays at its
peak), and all threads share one malloc arena, so compiling a shape takes 1-2 s longer
(XLA's compiler threads allocate a lot). The default ``scripts/train.py`` run: 680 s instead
of 735 s, 16 M instead of 107 M page faults, peak resident memory 5.5 GB instead of 3.7 GB,
the same metrics. Only glibc's ``mallopt`` is touched; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: at most 2 GiB stays with the process

_applied = False


def reuse_host_memory() -> bool:
    """Make freed host memory stay in the process for reuse; True when it takes effect.

    Call it before JAX's first computation: worker threads that have already allocated keep
    their own arenas, whose big blocks glibc always maps and unmaps. The command-line scripts,
    benchmarks and tests call it first thing.
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    from jax._src import xla_bridge  # no public way to ask whether the backend has started

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
