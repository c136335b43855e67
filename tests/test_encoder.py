"""The encoder module keeps FlaxDistilBertModule's parameter tree, so checkpoints load unchanged."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.model.dense import Dense, affine, cpu_affine
from mtl_jax.model.encoder import Attention, Encoder
from tests.helpers import dot_products, of_heads


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_parameter_tree_is_exactly_flax_distilbert_modules(sinusoidal):
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64, sinusoidal_pos_embds=sinusoidal
    )
    ids = np.ones((1, 8), np.int32)
    theirs = jax.eval_shape(FlaxDistilBertModule(config).init, jax.random.PRNGKey(0), ids, ids)["params"]
    ours = jax.eval_shape(Encoder(config).init, jax.random.PRNGKey(0), ids, np.zeros_like(ids), ids)["params"]
    flat = lambda tree: {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}  # noqa: E731
    assert flat(ours) == flat(theirs)


def test_attention_kernels_agree_and_fused_falls_back_where_rejected():
    """jax.nn.dot_product_attention (XLA) computes what Attention's own arithmetic computes;
    asking for the fused cuDNN kernel where it is rejected (here: no GPU) runs the XLA path."""
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (3, 24)).astype(np.int32)
    segments = np.repeat([[1] * 10 + [2] * 9 + [0] * 5], 3, axis=0).astype(np.int32)
    positions = np.where(np.arange(24) < 10, np.arange(24), np.arange(24) - 10).astype(np.int32)
    positions = np.broadcast_to(positions, ids.shape)
    params = Encoder(config).init(jax.random.PRNGKey(0), ids, positions, segments)["params"]
    xla = Encoder(config, attention_impl="xla").apply({"params": params}, ids, positions, segments)
    fused = Encoder(config, attention_impl="fused").apply({"params": params}, ids, positions, segments)
    np.testing.assert_array_equal(fused, xla)  # the fallback: the same program
    q, k, v = (jnp.asarray(rng.normal(size=(3, 24, 4, 8)), jnp.float32) for _ in range(3))
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    bias = jnp.where(same, 0.0, -1e30)[:, None]
    ours = Attention(config).apply({}, q, k, v, bias, True, method="xla_attention")
    theirs = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
    real = segments > 0  # padding tokens attend to nothing; their output is never read
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(theirs)[real], atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_layer_value_and_gradients_are_the_plain_products(dtype):
    """mtl_jax.model.dense.cpu_affine (every product of a bfloat16 dense layer laid out for
    XLA:CPU's fast kernels, forward and backward) gives x @ W + b and its gradients: to
    float32 rounding in float32, and in bfloat16 what the plain bfloat16 arithmetic gives; the
    Dense module has nn.Dense's parameters."""
    rng = np.random.default_rng(0)
    x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 20, 48), (48, 80), (80,)))
    cot = jnp.asarray(rng.normal(size=(3, 20, 80)), jnp.float32)

    def value_and_grads(fn):
        y, vjp = jax.vjp(lambda x, w, b: fn(x.astype(dtype), w.astype(dtype), b.astype(dtype)), x, w, b)
        return [t.astype(jnp.float32) for t in (y, *vjp(cot.astype(dtype)))]

    on_rows = lambda x, w, b: cpu_affine(x.reshape(-1, 48), w, b).reshape(3, 20, 80)  # noqa: E731  (as affine calls it)
    ours = [np.asarray(t) for t in jax.jit(lambda: value_and_grads(on_rows))()]
    plain = [np.asarray(t) for t in jax.jit(lambda: value_and_grads(lambda x, w, b: x @ w + b))()]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, p in zip(("y", "dx", "dw", "db"), ours, plain):
        scale = np.abs(p).max()
        np.testing.assert_allclose(a / scale, p / scale, atol=tol, err_msg=name)
    dense = jax.eval_shape(Dense(80).init, jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a: a.shape, dense) == jax.tree.map(
        lambda a: a.shape, jax.eval_shape(nn.Dense(80).init, jax.random.PRNGKey(0), x)
    )


def test_float32_dense_products_each_contract_one_axis():
    """A float32 dense layer over [rows, tokens, K] multiplies a 2-D view of x, so its kernel
    gradient is one product contracting one axis: XLA:CPU computes the two-axis contraction that
    autodiff writes for a 3-D x much more slowly (benchmarks/train_step.py, 128-token rows)."""
    rng = np.random.default_rng(0)
    x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 20, 48), (48, 80), (80,)))
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w, b: affine(x, w, b).sum(), argnums=(0, 1, 2)))(x, w, b).jaxpr
    contractions = [eqn.params["dimension_numbers"][0] for eqn in dot_products(jaxpr)]
    assert len(contractions) == 3  # y, dx, dW
    assert all(len(lhs) == len(rhs) == 1 for lhs, rhs in contractions), contractions


def test_every_product_of_a_whole_float32_train_step_contracts_one_axis(tiny_bert):
    """The same for the trainer's whole step (forward, backward, the weighting and the update) over
    packed rows of 3-D activations: no product anywhere contracts two axes."""
    import optax

    from mtl_jax.data.batching import TokenBatch
    from mtl_jax.inference import load_encoder
    from mtl_jax.model.multitask import MultiTaskModel, init_params
    from mtl_jax.training.steps import StepSpec, TrainState, train_step

    enc = load_encoder(tiny_bert)
    model = MultiTaskModel(enc.config, tasks=(("a", 3), ("b", 2)))
    params = init_params(model, enc.params, jax.random.PRNGKey(0))
    rows, length = 4, 16
    ids = np.full((rows, length), 1000, np.int32)
    segments = np.repeat([[1] * 8 + [2] * 8], rows, axis=0).astype(np.int32)
    positions = np.tile(np.arange(8, dtype=np.int32), (rows, 2))
    labels = {"a": np.full((rows, 16), -1, np.int32), "b": np.full((rows, 16), -1, np.int32)}
    labels["a"][:, 0], labels["b"][:, 1] = 1, 0
    batch = TokenBatch(ids, positions, segments, labels)
    spec = StepSpec(model, of_heads(model.tasks), optax.adamw(1e-3))
    state = TrainState.create(params, spec.tx.init(params))
    jaxpr = jax.make_jaxpr(lambda s, b: train_step(spec, s, b, jax.random.PRNGKey(0)))(state, batch).jaxpr
    contractions = [eqn.params["dimension_numbers"][0] for eqn in dot_products(jaxpr)]
    assert len(contractions) > 8 * model.config.n_layers  # forward and backward of every layer
    assert all(len(lhs) == len(rhs) == 1 for lhs, rhs in contractions), contractions


def test_the_suite_runs_on_the_cpu_in_process_and_in_the_processes_it_starts():
    import os
    import subprocess
    import sys

    assert jax.default_backend() == "cpu" and os.environ["JAX_PLATFORMS"] == "cpu"
    code = "import jax; print(jax.default_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "cpu"
