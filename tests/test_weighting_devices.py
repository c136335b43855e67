"""Every loss-weighting method's train step on 4 (forced host) devices with FSDP equals 1 device,
and runs in bf16 (a subprocess: the device count is fixed at JAX's start)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtl_jax.training.weighting import REGISTRY as METHODS
from tests.helpers import ROOT
from tests.test_parallel import ENV, SETUP

# Loss-weighting methods, two SGD steps each: 1 device, 4 devices with FSDP, and 4 devices with FSDP in bf16
# (the CPU's bf16 dense layers, mtl_jax.model.dense, under sharding).
EVERY_METHOD = (
    SETUP
    + r"""
import copy
import optax
from mtl_jax.training.steps import make_train_step

# one layer: the weighting's arithmetic over sharded gradients is what is tested (and compiles take half the time)
config = copy.deepcopy(enc.config)
config.n_layers = 1
model = MultiTaskModel(config, tasks=(("a", 3), ("b", 2)))
params = model.init(jax.random.PRNGKey(0), batches[0].ids[:1], batches[0].segments[:1])["params"]


def sgd_steps(devices, method, fsdp=False, model=model):
    mesh, w = make_mesh(devices), make(method)
    p0 = w.add_params(params, ["a", "b"])
    step = make_train_step(model, optax.sgd(0.1), w, tasks=of_heads(model.tasks))
    state = place_state(TrainState.create(jax.tree.map(jnp.array, p0), optax.sgd(0.1).init(p0), w.init(2)), mesh, fsdp)
    losses = []
    for b in batches[:2]:
        if w.every_task:  # two task sub-batches of 4 rows: [4, 2, ...]
            b = jax.tree.map(lambda v: np.stack([v[:4], v[4:]], axis=1), b)
        state, m = step(state, shard_batch(b, mesh), jax.random.PRNGKey(1))
        losses.append(float(m.totals.loss))
    return losses, jax.device_get(state.params), state

bf16 = model.clone(dtype=jnp.bfloat16)
out = {{}}
for method in {methods!r}:
    l1, p1, _ = sgd_steps(jax.devices()[:1], method)
    lf, pf, sf = sgd_steps(jax.devices(), method, fsdp=True)
    lb = sgd_steps(jax.devices(), method, fsdp=True, model=bf16)[0] if method in {bf16_methods!r} else None
    diff = lambda p: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    out[method] = {{"losses1": l1, "losses_fsdp": lf, "losses_bf16": lb, "moved": moved, "diff_fsdp": diff(pf),
                   "devices": len(sf.params["encoder"]["transformer"]["layer"]["0"]["ffn"]["lin1"]["kernel"].sharding.device_set),
                   }}
print(json.dumps(out))
"""
)


@pytest.mark.slow
def test_loss_weightings_on_four_devices_with_fsdp_match_one_and_run_in_bf16(tiny_bert):
    env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # sum is test_parallel.test_four_devices_match_one's; static, dwa (in its first two periods) and rlw
    # differ from it only in the weights' values; cagrad combines the sharded gradients as mgda does, with
    # another solve on the (replicated) Gram matrix
    methods = [m for m in METHODS if m not in ("sum", "static", "dwa", "rlw", "cagrad")]
    # bf16 compute changes the forward and backward, not a method's float32 arithmetic on the losses and
    # gradients: one method per path (learned parameters; per-task gradients of task-stacked batches)
    bf16_methods = ["uncertainty", "gradnorm"]
    code = EVERY_METHOD.format(root=str(ROOT), model=str(tiny_bert), methods=methods, bf16_methods=bf16_methods)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == set(methods) == {"uncertainty", "famo", "pcgrad", "mgda", "gradnorm"}
    for method, o in out.items():
        assert o["moved"] > 1e-3, method  # two real updates
        assert o["devices"] == 4, method
        assert o["losses_fsdp"] == pytest.approx(o["losses1"], abs=1e-5), method
        assert o["diff_fsdp"] <= 1e-5, (method, o)
        if method in bf16_methods:  # bf16 compute, the same losses to bf16's precision
            assert o["losses_bf16"] == pytest.approx(o["losses1"], rel=0.02), method
