"""Data parallelism: the same step on 4 (forced host) devices as on 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtl_jax import MtlError
from mtl_jax.parallel import check_batch_size, make_mesh
from tests.conftest import ROOT

SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from mtl_jax.model import MultiTaskModel, init_params, load_encoder
from mtl_jax.parallel import make_mesh, replicate, shard_batch
from mtl_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

assert jax.device_count() == 4, jax.devices()
enc = load_encoder({model!r})
model = MultiTaskModel(enc.config, tasks=(("a", 3), ("b", 2)))
params = init_params(model, enc.params, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
batches = []
for i in range(3):
    labels = np.stack([rng.integers(0, 3, 8), rng.integers(0, 2, 8)], 1).astype(np.int32)
    labels[:4, 1] = -1
    batches.append({{"input_ids": rng.integers(1000, 30000, (8, 16)).astype(np.int32),
                    "attention_mask": np.ones((8, 16), np.int32), "labels": labels}})

def train(devices):
    mesh = make_mesh(devices)
    tx = make_optimizer(params, frozenset(), OptimConfig(lr=1e-3, head_lr=1e-3, total_steps=10, warmup_steps=0), 2)
    step = make_train_step(model, tx, {{"a": 1.0, "b": 1.0}})
    state = replicate(TrainState.create(jax.tree.map(jnp.array, params), tx.init(params)), mesh)
    losses = []
    for b in batches:
        state, m = step(state, shard_batch(b, mesh), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state

l4, p4, s4 = train(jax.devices())
l1, p1, _ = train(jax.devices()[:1])
diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)))
n_shards = len(s4.params["heads"]["a"]["kernel"].sharding.device_set)
print(json.dumps({{"losses4": l4, "losses1": l1, "param_diff": diff, "devices": n_shards}}))
"""


def test_four_devices_match_one(tiny_bert):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(root=str(ROOT), model=str(tiny_bert))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4  # parameters really live on all four devices
    assert out["losses4"] == pytest.approx(out["losses1"], abs=1e-5)
    assert out["param_diff"] <= 1e-5


def test_batch_size_must_divide_by_device_count():
    import jax

    mesh = make_mesh([jax.devices()[0]] * 1)
    check_batch_size(7, mesh)  # one device: anything goes
    fake = type("FakeMesh", (), {"devices": __import__("numpy").zeros(4)})()
    with pytest.raises(MtlError, match=r"--batch-size 30 does not divide by the 4 devices; use 28 or 32"):
        check_batch_size(30, fake)
