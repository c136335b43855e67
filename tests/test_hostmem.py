"""reuse_host_memory: a compiled function's scratch block is reused, not mapped afresh per call."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

# one jitted call with a 200 MiB scratch block; prints whether the tuning took effect, the fewest
# page faults among 10 calls after the first, what reuse_host_memory says when called again after
# JAX has computed, and whether the CPU backend dispatches asynchronously
PROBE = """
import resource, sys
if sys.argv[1] == "reuse":
    import mtl_jax.commands.train  # what every command-line program imports first
from mtl_jax.training.hostmem import reuse_host_memory
applied = reuse_host_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.exp(x) * jnp.sin(x[::-1])).sum())
x = jnp.ones((8192, 6400))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes == 200 * 2**20
f(x).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults), reuse_host_memory(), jax.config.values["jax_cpu_enable_async_dispatch"], flush=True)
"""


def _probe(mode: str, **env: str) -> list[str]:
    """The probe's printed values."""
    env = os.environ | env
    return subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()


def fresh_block_faults() -> int:
    """Page faults that mapping the 200 MiB block afresh costs: 4 KiB pages, or 2 MiB ones where
    transparent huge pages are always on."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.exists() and "[always]" in thp.read_text()
    return 200 * 2**20 // (2**21 if huge else 2**12)


@pytest.mark.slow  # three child processes: make test-slow
def test_scratch_memory_is_reused_across_calls():
    applied, fewest_reused, _, asynchronous = _probe("reuse")
    assert applied == "True" and asynchronous == "False"  # each call runs in the main thread's arena
    applied, fewest_default, late, asynchronous = _probe("default")
    assert applied == "False" and asynchronous == "True"
    assert late == "False"  # too late once JAX has computed: the CPU client has started
    # glibc's default maps the block afresh on every call; reused, the pages are already there
    assert int(fewest_default) >= 0.75 * fresh_block_faults()
    assert int(fewest_reused) * 50 < int(fewest_default)
    # MTL_JAX_MALLOC=default: the programs keep glibc's defaults and JAX's dispatch
    applied, fewest_opted_out, _, asynchronous = _probe("reuse", MTL_JAX_MALLOC="default")
    assert applied == "False" and asynchronous == "True"
    assert int(fewest_opted_out) >= 0.75 * fresh_block_faults()
