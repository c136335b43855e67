"""The optimizer against a NumPy AdamW: warm-up and decay, per-group (layer-wise) learning
rates, the weight-decay mask, global-norm clipping over what trains, frozen groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mtl_jax.training.freezing import group_of
from mtl_jax.training.optim import make_optimizer, schedule
from tests.helpers import optim

# a tree with every kind of parameter the groups and the decay mask tell apart
PARAMS = {
    "encoder": {
        "embeddings": {"word_embeddings": {"embedding": np.full((4, 3), 0.5)}},
        "transformer": {
            "layer": {
                str(i): {
                    "ffn": {"lin1": {"kernel": np.full((3, 3), 1.0 + i), "bias": np.full(3, 0.2)}},
                    "sa_layer_norm": {"scale": np.ones(3), "bias": np.zeros(3)},
                }
                for i in range(2)
            }
        },
    },
    "heads": {"a": {"kernel": np.full((3, 2), -1.0), "bias": np.full(2, 0.3)}},
}


def test_schedule_warms_up_then_decays_to_zero():
    lin = schedule(optim(100, warmup=0.1))
    assert [float(lin(s)) for s in (0, 5, 10, 55, 100)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-6)
    cos = schedule(optim(100, warmup=0.1, decay="cosine"))
    assert float(cos(10 + 90 // 4 + 0.5)) == pytest.approx((1 + np.cos(np.pi / 4)) / 2, abs=1e-6)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    assert float(schedule(optim(100))(0)) == 1.0  # no warm-up: the first step at the peak


def _reference(params, grads_seq, frozen, cfg, lrs):
    """NumPy AdamW as the module docstring describes it."""
    flat = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    trains = [k for k in flat if group_of(k) not in frozen]
    m = {k: np.zeros_like(flat[k]) for k in trains}
    v = {k: np.zeros_like(flat[k]) for k in trains}
    sched = schedule(cfg)
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in traverse_util.flatten_dict(grads, sep="/").items()}
        norm = np.sqrt(sum((g[k] ** 2).sum() for k in trains))  # frozen gradients never count
        scale = min(1.0, cfg.clip_norm / norm)
        for k in trains:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.999 * v[k] + 0.001 * gk**2
            u = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
            if not k.endswith(("bias", "scale")):
                u = u + cfg.weight_decay * flat[k]
            flat[k] = flat[k] - lrs[group_of(k)] * float(sched(t - 1)) * u
    return flat


@pytest.mark.parametrize("frozen", [frozenset(), frozenset({"embeddings", "layer_0"})])
def test_adamw_matches_numpy_with_layer_decay_weight_decay_mask_and_clipping(frozen):
    cfg = optim(10, lr=1e-2, head_lr=5e-2, layer_decay=0.5, weight_decay=0.1, clip_norm=0.7, warmup=0.2)
    lrs = {"layer_1": 1e-2, "layer_0": 5e-3, "embeddings": 2.5e-3, "head:a": 5e-2}
    rng = np.random.default_rng(0)
    grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape) * s, PARAMS) for s in (3.0, 0.01, 1.0, 0.05)]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), PARAMS)
    tx = make_optimizer(params, frozen, cfg, n_layers=2)
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), state, params)
        params = optax.apply_updates(params, updates)
    want = _reference(PARAMS, grads_seq, frozen, cfg, lrs)
    got = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-7, err_msg=k)
        moved = not np.array_equal(got[k], np.asarray(traverse_util.flatten_dict(PARAMS, sep="/")[k], np.float32))
        assert moved == (group_of(k) not in frozen), k
