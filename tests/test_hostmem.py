"""reuse_host_memory: a compiled function's scratch block is reused, not mapped afresh per call."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

# one jitted call with a 200 MiB scratch block; prints whether the tuning took effect and the
# fewest page faults among 10 calls after the first
PROBE = """
import resource, sys
from mtl_jax.hostmem import reuse_host_memory
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
print(applied, min(faults), reuse_host_memory())
"""


def _probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_scratch_memory_is_reused_across_calls():
    applied, fewest, _ = _probe("reuse")
    assert applied == "True"
    assert int(fewest) < 1000  # 200 MiB of fresh pages would be 51,200 faults
    applied, fewest, late = _probe("default")
    assert applied == "False" and int(fewest) > 40_000
    assert late == "False"  # too late once JAX has computed: worker threads keep their arenas
