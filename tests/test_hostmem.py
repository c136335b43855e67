"""reuse_host_memory: a compiled function's scratch block is reused, not mapped afresh per call."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

# one jitted call with a 200 MiB scratch block; prints whether the tuning took effect and the
# fewest page faults among 10 calls after the first; glibc's malloc_stats lists the arenas on stderr
PROBE = """
import ctypes, resource, sys
if sys.argv[1] == "reuse":
    import mtl_jax.commands.train  # what every command-line program imports first
from mtl_jax.training.hostmem import reuse_host_memory
applied = reuse_host_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.cumsum(x, 0) * jnp.cumsum(x, 1)).sum())
x = jnp.ones((4096, 4096))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes > 150 * 2**20
f(x).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults), reuse_host_memory(), flush=True)
ctypes.CDLL(None).malloc_stats()
"""


def _probe(mode: str, **env: str) -> tuple[list[str], int]:
    """The probe's printed values and the number of malloc arenas its threads used."""
    env = os.environ | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def fresh_block_faults() -> int:
    """Page faults that mapping the 200 MiB block afresh costs: 4 KiB pages, or 2 MiB ones where
    transparent huge pages are always on."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.exists() and "[always]" in thp.read_text()
    return 200 * 2**20 // (2**21 if huge else 2**12)


def test_scratch_memory_is_reused_across_calls():
    (applied, fewest_reused, _), arenas = _probe("reuse")
    assert applied == "True"
    # tuned before NumPy's or JAX's first thread: a thread in an arena of its own maps big blocks afresh
    assert arenas == 1
    (applied, fewest_default, late), arenas = _probe("default")
    assert applied == "False"
    assert late == "False"  # too late once JAX has computed: worker threads keep their arenas
    assert arenas > 1
    # glibc's default maps the block afresh on every call; reused, the pages are already there
    assert int(fewest_default) >= 0.75 * fresh_block_faults()
    assert int(fewest_reused) * 50 < int(fewest_default)
    # MTL_JAX_MALLOC=default: the programs keep glibc's defaults (the smaller peak)
    (applied, fewest_opted_out, _), arenas = _probe("reuse", MTL_JAX_MALLOC="default")
    assert applied == "False" and arenas > 1
    assert int(fewest_opted_out) >= 0.75 * fresh_block_faults()
