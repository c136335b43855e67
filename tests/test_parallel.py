"""Data parallelism: the same steps on 4 (forced host) devices, and the same training run in 2
processes, as on 1 device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from mtl_jax import MtlError
from mtl_jax.training.parallel import check_batch_size, make_mesh
from tests.helpers import ROOT, tiny_train_args

# Three training steps of a tiny model on fixed batches, on the devices of ``make_mesh(devices)``.
SETUP = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from mtl_jax.data.batching import single_rows
from mtl_jax.inference import load_encoder
from mtl_jax.model.multitask import MultiTaskModel, init_params
from mtl_jax.training.parallel import make_mesh, place_state, shard_batch
from mtl_jax.config import TrainConfig
from mtl_jax.training.optim import OptimConfig
from mtl_jax.training.steps import TrainState, build_train_step
from mtl_jax.training.weighting import make
from tests.helpers import of_heads

enc = load_encoder({model!r})
model = MultiTaskModel(enc.config, tasks=(("a", 3), ("b", 2)))
params = init_params(model, enc.params, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
batches = []
for i in range(3):
    labels = np.stack([rng.integers(0, 3, 8), rng.integers(0, 2, 8)], 1).astype(np.int32)
    labels[:4, 1] = -1
    ids = rng.integers(1000, 30000, (8, 16)).astype(np.int32)
    batches.append(single_rows(ids, np.ones_like(ids), dict(a=labels[:, 0], b=labels[:, 1])))

def train(devices, fsdp=False):
    mesh = make_mesh(devices)
    tx, step = build_train_step(model, params, frozenset(), OptimConfig.from_config(TrainConfig(lr=1e-3, head_lr=1e-3, warmup=0.0), 10), tasks=of_heads(model.tasks))
    state = place_state(TrainState.create(jax.tree.map(jnp.array, params), tx.init(params)), mesh, fsdp)
    losses = []
    for b in batches:
        state, m = step(state, shard_batch(b, mesh), jax.random.PRNGKey(1))
        losses.append(float(m.totals.loss))
    return losses, jax.device_get(state.params), state
"""

FOUR_DEVICES = (
    SETUP
    + r"""
assert jax.device_count() == 4, jax.devices()
l4, p4, s4 = train(jax.devices())
l1, p1, _ = train(jax.devices()[:1])
lf, pf, sf = train(jax.devices(), fsdp=True)
diff = lambda p: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)))
n_shards = len(s4.params["heads"]["a"]["kernel"].sharding.device_set)
mu = sf.opt_state["groups"].inner_states["layer_0"].inner_state[0].mu["encoder"]["transformer"]["layer"]["0"]["ffn"]["lin1"]["kernel"]
print(json.dumps({{"losses4": l4, "losses1": l1, "param_diff": diff(p4), "devices": n_shards,
                  "losses_fsdp": lf, "param_diff_fsdp": diff(pf),
                  "fsdp_shard_rows": [s.data.shape for s in mu.addressable_shards][0],
                  "fsdp_full": list(mu.shape)}}))
"""
)

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.mark.slow  # a process with four forced devices: make test-slow
def test_four_devices_match_one(tiny_bert):
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    code = FOUR_DEVICES.format(root=str(ROOT), model=str(tiny_bert))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4  # parameters really live on all four devices
    assert out["losses4"] == pytest.approx(out["losses1"], abs=1e-5)
    assert out["param_diff"] <= 1e-5
    # FSDP: each device holds a quarter of the large arrays (Adam moments too), same training
    assert out["losses_fsdp"] == pytest.approx(out["losses1"], abs=1e-5)
    assert out["param_diff_fsdp"] <= 1e-5
    full, shard = out["fsdp_full"], out["fsdp_shard_rows"]
    assert sorted(shard) != sorted(full) and np.prod(shard) * 4 == np.prod(full)


def test_batch_size_must_divide_by_device_count():
    import jax

    mesh = make_mesh([jax.devices()[0]] * 1)
    check_batch_size(7, mesh)  # one device: anything goes
    fake = type("FakeMesh", (), {"devices": __import__("numpy").zeros(4)})()
    with pytest.raises(MtlError, match=r"--batch-size 30 does not divide by the 4 devices; use 28 or 32"):
        check_batch_size(30, fake)


@pytest.mark.slow
def test_two_process_training_run_writes_once_and_matches_one_process(tmp_path, tiny_bert, tiny_data):
    """Two processes on localhost (gloo collectives, one CPU device each) train like one process
    with its batch on one device; process 0 alone writes the outputs and the log."""
    args = tiny_train_args(tiny_bert, tiny_data, "--epochs", "1", "--freeze", "none", "--log-every", "1", "--no-export")
    train = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    one = subprocess.Popen([*train, "--out", str(tmp_path / "one")], stderr=subprocess.PIPE, text=True, env=ENV)
    for attempt in range(3):  # the free port can be taken by another program before the coordinator binds it
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        two = [f"--coordinator=localhost:{port}", "--num-processes=2", f"--out={tmp_path / 'two'}", "--overwrite"]
        procs = [
            subprocess.Popen([*train, *two, f"--process-id={i}"], stderr=subprocess.PIPE, text=True, env=ENV)
            for i in range(2)
        ]
        errs = [p.communicate(timeout=600)[1] for p in procs]
        if all(p.returncode == 0 for p in procs) or attempt == 2 or "already in use" not in "".join(errs):
            break
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]
    assert "backend cpu (2 device(s)" in errs[0]
    assert "epoch 1/1 validation" in errs[0] and "validation" not in errs[1]  # process 1 logs no progress
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in two] == [(r["split"], r["step"]) for r in ref]
    train_losses = [(a["loss"], b["loss"]) for a, b in zip(two, ref) if a["split"] == "train"]
    assert len(train_losses) >= 17  # every step (17 per epoch): the same loss on two processes as on one
    np.testing.assert_allclose(*zip(*train_losses), rtol=1e-5)
    two, ref = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("two", "one"))
    for split in ("validation", "test"):
        for t in ("topic", "sentiment"):
            assert two[split][t]["confusion"] == ref[split][t]["confusion"]
            assert two[split][t]["loss"] == pytest.approx(ref[split][t]["loss"], rel=1e-5)
