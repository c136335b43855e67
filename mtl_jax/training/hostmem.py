"""Host memory on the CPU backend: keep the scratch block a compiled step frees for the next step.

XLA:CPU gives each call of a compiled function one block of scratch memory and frees it
when the call ends. glibc serves a block that large with ``mmap`` and returns it with
``munmap``, so on every step the kernel faults in and zeroes fresh pages. Two settings keep it:

- no ``mmap`` and a trim threshold of 2 GiB in glibc's malloc: a freed block stays in the
  heap of the arena it came from, and the next call of that size reuses it;
- synchronous dispatch on the CPU backend (``jax_cpu_enable_async_dispatch`` off): each call
  runs in the thread that makes it, the program's main thread, whose arena is glibc's main
  one. With asynchronous dispatch the call runs on one of the client's worker threads, and a
  worker's arena is a set of 64 MiB heaps that cannot hold the block, so glibc maps it afresh
  whatever the settings.

Every other thread keeps the arena glibc gives it, so compiler, tokenizer and reader threads
do not queue for one lock, and their freed memory does not sit between the main thread's
blocks (putting every thread in the one main arena reuses as much, but a run then kept about
a gigabyte more). What it buys on one step and on a run is measured in docs/performance.md
(``benchmarks/train_step.py --default-malloc`` is the A/B switch). Only glibc's ``mallopt``
and the CPU backend's dispatch are touched; a GPU or TPU backend dispatches as before.
``MTL_JAX_MALLOC=default`` in the environment leaves both as they are.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: at most 2 GiB stays with the process

_applied = False


def reuse_host_memory() -> bool:
    """Make a compiled call's freed scratch memory stay in the process for the next call; True when
    it takes effect.

    Call it before JAX's first computation (the CPU client reads its dispatch setting when it
    starts). Importing :mod:`mtl_jax.commands` (every command-line program) calls it first thing;
    the benchmarks and tests call it before their first computation.
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
    if mallopt is None or not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        return False
    import jax  # the setting is a flag of JAX's, read when the CPU client starts

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _applied = True
    return _applied
