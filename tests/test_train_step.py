"""MultiTaskModel, freezing scenarios, the optimizer and the jit-compiled steps (tiny encoder)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mtl_jax import MtlError
from mtl_jax.data.batching import InputPipeline, single_rows
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.inference import load_encoder
from mtl_jax.model.encoder import Encoder
from mtl_jax.model.multitask import MultiTaskModel, init_params, pool_segments
from mtl_jax.training.evaluation import evaluate
from mtl_jax.training.freezing import (
    Phase,
    frozen_groups,
    group_of,
    group_sizes,
    param_groups,
    parse_phases,
    phase_at,
    phase_starts,
)
from mtl_jax.training.optim import carry_opt_state, count_numbers, make_optimizer
from mtl_jax.training.steps import TrainState, build_train_step, make_eval_step, make_train_step, task_losses
from mtl_jax.training.weighting import make, mean_losses
from tests.helpers import by_task, dot_products, of_heads, optim

TASKS = (("task_a", 3), ("task_b", 2))


@pytest.fixture(scope="module")
def setup(tiny_bert):
    enc = load_encoder(tiny_bert)
    model = MultiTaskModel(enc.config, tasks=TASKS, pooling="mean")
    params = init_params(model, enc.params, jax.random.PRNGKey(0))
    return model, params


def _batch(seed=0, B=8, L=16, labels=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[::2, L // 2 :] = 0
    if labels is None:
        labels = np.stack([rng.integers(0, 3, B), rng.integers(0, 2, B)], axis=1).astype(np.int32)
        labels[: B // 2, 1] = -1  # first half: task_a examples only
        labels[B // 2 :, 0] = -1  # second half: task_b examples only
    return single_rows(ids, mask, by_task(labels))


def _state(model, params, frozen, lr=1e-2):
    tx, step = build_train_step(model, params, frozen, optim(100, lr=lr, head_lr=lr), tasks=of_heads(model.tasks))
    # copy: the step donates its state
    state = TrainState.create(jax.tree.map(jnp.array, params), tx.init(params))
    return tx, step, state


def test_forward_gives_every_task_and_the_embedding(setup):
    model, params = setup
    b = _batch()
    logits, pooled = model.apply({"params": params}, b.ids, b.segments)
    chex.assert_shape(logits["task_a"], (8, 3))
    chex.assert_shape(logits["task_b"], (8, 2))
    chex.assert_shape(pooled, (8, model.config.dim))
    assert set(params) == {"encoder", "heads"} and set(params["heads"]) == {"task_a", "task_b"}


def test_pooling_is_masked():
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)), jnp.float32)
    m = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(pool_segments(h, m, "mean", 1)[0, 0], h[0, :2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pool_segments(h, m, "max", 1)[0, 0], h[0, :2].max(0))


def test_cls_pooling_is_the_first_tokens_full_state(setup):
    model, params = setup
    b = _batch()
    positions = jnp.broadcast_to(jnp.arange(b.ids.shape[1]), b.ids.shape)
    full = Encoder(model.config).apply({"params": params["encoder"]}, b.ids, positions, b.segments)
    cls = model.clone(pooling="cls").apply({"params": params}, b.ids, b.segments, method="embed")
    np.testing.assert_allclose(cls, full[:, 0], atol=1e-5)


def test_every_parameter_matches_exactly_one_rule(setup):
    _, params = setup
    groups = param_groups(params)
    flat = traverse_util.flatten_dict(groups, sep="/")
    assert set(flat.values()) == {"embeddings", "layer_0", "layer_1", "head:task_a", "head:task_b"}
    with pytest.raises(ValueError, match="matched 0 freezing rules"):
        group_of("somewhere/else/kernel")


@pytest.mark.parametrize("spec", ["none", "backbone", "all", "head:task_a", "head:task_b", "top:1"])
def test_frozen_stay_bit_identical_and_trainable_change(setup, spec):
    model, params = setup
    groups = set(jax.tree.leaves(param_groups(params)))
    frozen = frozen_groups(spec, groups)
    _, step, state = _state(model, params, frozen)
    before = jax.tree.map(np.asarray, params)
    for i in range(3):
        state, _ = step(state, _batch(i), jax.random.PRNGKey(1))
    after = jax.tree.map(np.asarray, state.params)
    for path, g in traverse_util.flatten_dict(param_groups(params), sep="/").items():
        a = traverse_util.flatten_dict(before, sep="/")[path]
        b = traverse_util.flatten_dict(after, sep="/")[path]
        if g in frozen:
            assert a.tobytes() == b.tobytes(), f"{path} ({g}) changed under {spec}"
        else:
            # word embeddings only change in the rows the batches used
            assert not np.array_equal(a, b), f"{path} ({g}) did not change under {spec}"


def test_frozen_parameters_hold_no_optimizer_state(setup):
    model, params = setup
    groups = set(jax.tree.leaves(param_groups(params)))
    _, _, state = _state(model, params, frozen_groups("backbone", groups))
    head_numbers = count_numbers(params["heads"])
    # Adam's mu and nu for the heads, plus one step count per trainable group and the schedule's count
    assert count_numbers(state.opt_state) == 2 * head_numbers + 2 + 1
    _, _, full = _state(model, params, frozen_groups("none", groups))
    assert count_numbers(full.opt_state) == 2 * count_numbers(params) + len(groups) + 1


def test_top_k_freezes_embeddings_and_lower_layers():
    groups = {"embeddings", "layer_0", "layer_1", "layer_2", "head:a"}
    assert frozen_groups("top:1", groups) == {"embeddings", "layer_0", "layer_1"}
    assert frozen_groups("top:3", groups) == {"embeddings"}
    with pytest.raises(MtlError, match="between 0 and 3"):
        frozen_groups("top:4", groups)
    with pytest.raises(MtlError, match="no task 'c'"):
        frozen_groups("head:c", groups)


def test_phases_parse_and_switch():
    phases = parse_phases("backbone, top:2@epoch:1, none@step:500")
    assert phases == [Phase("backbone"), Phase("top:2", "epoch", 1), Phase("none", "step", 500)]
    starts = phase_starts(phases, steps_per_epoch=10)
    assert starts == [0, 10, 500]
    assert [phase_at(starts, s) for s in (0, 9, 10, 499, 500, 10_000)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(MtlError, match="needs @epoch:N or @step:N"):
        parse_phases("backbone,none@3")


def test_masked_loss_matches_numpy():
    logits = {
        "a": jnp.asarray([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]]),
        "b": jnp.asarray([[0.3, -0.3], [1.0, 2.0], [0.0, 0.0]]),
    }
    labels = by_task(jnp.asarray([[0, -1], [2, 1], [-1, -1]]), ("a", "b"))
    per = task_losses(logits, labels, of_heads((("a", 3), ("b", 2))))

    def ce(row, y):
        row = np.asarray(row, np.float64)
        return -(row[y] - np.log(np.exp(row).sum()))

    want_a = (ce([2.0, 0.5, -1.0], 0) + ce([0.1, 0.2, 0.3], 2)) / 2
    want_b = ce([1.0, 2.0], 1)
    means, present = mean_losses(per, ["a", "b"])
    np.testing.assert_allclose(means, [want_a, want_b], rtol=1e-6)
    np.testing.assert_array_equal(present, [1, 1])
    assert int(per["a"].count) == 2 and int(per["a"].correct) == 2
    # a batch with no labels for a task adds exactly 0, never NaN
    none = by_task(jnp.full((3, 2), -1), ("a", "b"))
    means, present = mean_losses(task_losses(logits, none, of_heads((("a", 3), ("b", 2)))), ["a", "b"])
    np.testing.assert_array_equal(means, [0.0, 0.0])
    np.testing.assert_array_equal(present, [0.0, 0.0])


def test_jit_and_eager_steps_agree_and_second_call_does_not_recompile(setup):
    model, params = setup
    frozen = frozenset()
    tx, step, state = _state(model, params, frozen)
    eager_state = TrainState.create(params, tx.init(params))
    with jax.disable_jit():
        _, eager_step, _ = _state(model, params, frozen)
        eager_state, eager_m = eager_step(eager_state, _batch(0), jax.random.PRNGKey(1))
    state, m = step(state, _batch(0), jax.random.PRNGKey(1))
    np.testing.assert_allclose(float(m.totals.loss), float(eager_m.totals.loss), rtol=1e-5)
    chex.assert_trees_all_close(state.params, eager_state.params, atol=1e-5)
    compiled = step._cache_size()
    state, _ = step(state, _batch(1), jax.random.PRNGKey(1))
    assert step._cache_size() == compiled == 1


def test_phase_change_keeps_head_state(setup):
    model, params = setup
    groups = set(jax.tree.leaves(param_groups(params)))
    f0, f1 = frozen_groups("backbone", groups), frozen_groups("none", groups)
    cfg = optim(10)
    tx0 = make_optimizer(params, f0, cfg, 2)
    s0 = tx0.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, s0 = tx0.update(grads, s0, params)
    tx1 = make_optimizer(params, f1, cfg, 2)
    s1 = carry_opt_state(s0, tx1.init(params), f0, f1)
    head_state = s1["groups"].inner_states["head:task_a"].inner_state[0]
    assert int(head_state.count) == 1 and float(jnp.abs(head_state.mu["heads"]["task_a"]["kernel"]).sum()) > 0
    assert int(s1["groups"].inner_states["layer_0"].inner_state[0].count) == 0
    assert int(s1["schedule"].count) == 1  # the global schedule keeps counting


def test_evaluate_counts_every_example_once(setup):
    model, params = setup
    rng = np.random.default_rng(0)
    n = 37  # not a multiple of the batch size
    ids = [
        np.concatenate([[101], rng.integers(1000, 30000, rng.integers(1, 40)), [102]]).astype(np.int32)
        for _ in range(n)
    ]
    labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], axis=1).astype(np.int32)
    labels[:10, 1] = -1
    data = Tokenized(ids, by_task(labels), np.zeros(n, np.int32), 0)
    pipeline = InputPipeline({"test": data}, pad_id=0, max_length=64, batch_size=8, eval_batch_size=8, seed=0)
    res = evaluate(make_eval_step(model, of_heads(model.tasks)), params, pipeline, data, of_heads(model.tasks))
    assert res["task_a"]["examples"] == n and res["task_b"]["examples"] == n - 10
    assert np.asarray(res["task_a"]["confusion"]).sum() == n
    # the same confusion matrices as a forward pass of each example alone (padded, masked)
    want = {"task_a": np.zeros((3, 3), int), "task_b": np.zeros((2, 2), int)}
    alone = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask)[0])
    for x, y in zip(ids, labels):
        mask = (np.arange(64) < len(x)).astype(np.int32)[None]
        logits = alone(np.pad(x, (0, 64 - len(x)))[None], mask)
        for t, (task, matrix) in enumerate(want.items()):
            if y[t] >= 0:
                matrix[y[t], int(np.argmax(logits[task][0]))] += 1
    for task, matrix in want.items():
        np.testing.assert_array_equal(res[task]["confusion"], matrix, err_msg=task)


def test_bfloat16_computes_in_bf16_with_float32_params_and_loss(setup):
    model, params = setup
    bf16 = model.clone(dtype=jnp.bfloat16)
    b = _batch()
    logits16, _ = bf16.apply({"params": params}, b.ids, b.segments)
    logits32, _ = model.apply({"params": params}, b.ids, b.segments)
    assert logits16["task_a"].dtype == jnp.float32  # heads and loss in float32
    # the encoder's matrix products really multiply bf16: Q, K, V, out, FFN x2 and attention x2 per layer
    jaxpr = jax.make_jaxpr(lambda p: bf16.apply({"params": p}, b.ids, b.segments))(params).jaxpr
    operands = [tuple(v.aval.dtype for v in eqn.invars) for eqn in dot_products(jaxpr)]
    bf16_dots = [d for d in operands if d == (jnp.bfloat16, jnp.bfloat16)]
    assert len(bf16_dots) >= 8 * model.config.n_layers, operands
    np.testing.assert_allclose(logits16["task_a"], logits32["task_a"], atol=0.05)
    tx, _, state = _state(model, params, frozenset())
    step = make_train_step(bf16, tx, tasks=of_heads(bf16.tasks))
    state, m = step(state, _batch(), jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(m.totals.loss))


def test_compiled_dot_flops_reads_each_product_off_the_program():
    from mtl_jax.model.flops import compiled_dot_flops

    def flops(f, *shapes):
        args = [jnp.ones(s, jnp.float32) for s in shapes]
        return compiled_dot_flops(jax.jit(f).lower(*args).compile().as_text())

    assert flops(jnp.dot, (3, 5), (5, 7)) == 2 * 3 * 5 * 7
    assert flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (4, 3, 5), (4, 5, 7)) == 4 * 2 * 3 * 5 * 7
    two = flops(lambda a, b, c: jnp.dot(a, b).sum() + jnp.dot(a, c).sum(), (3, 5), (5, 7), (5, 2))
    assert two == 2 * 3 * 5 * 7 + 2 * 3 * 5 * 2


@pytest.mark.parametrize(
    "freeze, pooling, targets",
    [
        ("none", "mean", None),
        ("top:1", "cls", None),
        ("lora", "mean", ("q", "k", "v", "out", "ffn")),
        ("lora", "cls", ("k", "v")),
    ],
)
def test_flop_count_is_what_xla_computes(freeze, pooling, targets):
    """The MFU figures' FLOP count equals the dot products XLA keeps in the compiled train step, for
    each freezing scenario (the backward products a frozen part does not need are gone) on packed rows."""
    from transformers import DistilBertConfig

    from benchmarks.train_step import random_batch
    from mtl_jax.data.packing import MAX_SEGMENTS
    from mtl_jax.model.flops import compiled_dot_flops, train_step_flops
    from mtl_jax.model.lora import LoRA, with_lora

    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    if targets:
        config = with_lora(config, LoRA(rank=4, alpha=8.0, targets=targets))
    model = MultiTaskModel(config, tasks=TASKS, pooling=pooling)
    batch = jax.tree.map(jnp.asarray, random_batch(np.random.default_rng(0), 4, 32, 4))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch.ids[:1], batch.segments[:1])["params"]
    groups = set(jax.tree.leaves(param_groups(params)))
    frozen = frozen_groups(freeze, groups)
    tx, step = build_train_step(model, params, frozen, optim(100), tasks=of_heads(model.tasks))
    state = jax.eval_shape(lambda p: TrainState.create(p, tx.init(p)), params)  # shapes are all it needs
    compiled = step.lower(state, batch, jax.random.PRNGKey(1)).compile()
    counted = train_step_flops(config, 4, 32, groups - frozen, pooling, MAX_SEGMENTS)
    assert counted == compiled_dot_flops(compiled.as_text())


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_flop_count_is_what_xla_computes(tiny_bert, pooling):
    """encode()'s packed calls: the forward FLOPs counted for its MFU figure are the compiled call's."""
    from mtl_jax.data.packing import MAX_SEGMENTS, packed_calls
    from mtl_jax.model.flops import compiled_dot_flops, embed_flops

    enc = load_encoder(tiny_bert)
    rng = np.random.default_rng(0)
    ids = [list(rng.integers(1000, 2000, rng.integers(3, 40))) for _ in range(50)]
    call = next(packed_calls(ids, 8, enc.tokenizer.pad_id))
    args = (enc.params, call.ids, call.positions, call.segments)
    compiled = enc._embed_fn.lower(*args, pooling=pooling, normalize=True).compile()
    counted = embed_flops(enc.config, *call.ids.shape, pooling, MAX_SEGMENTS)
    assert counted == compiled_dot_flops(compiled.as_text())


@pytest.mark.parametrize("method", ["uncertainty", "famo", "gradnorm"])
def test_grad_accumulation_equals_the_whole_batch(setup, method):
    """K micro-batches of batch / K rows give the whole batch's step (dropout off): loss, per-task sums,
    parameters and the method's state, for loss methods (famo: weights from the batch's losses) and
    gradient methods (per-task gradients accumulated, then combined)."""
    import copy

    model, params = setup
    config = copy.deepcopy(model.config)
    config.dropout = config.attention_dropout = 0.0
    quiet = model.clone(config=config, head_dropout=0.0)
    w = make(method)
    p0 = w.add_params(params, [t for t, _ in TASKS])
    batch = _batch(3, B=16)
    if w.every_task:  # two task sub-batches of 8 rows: arrays [8, 2, ...]
        batch = jax.tree.map(lambda v: np.stack([v[:8], v[8:]], axis=1), batch)
        batch.labels["task_b"][:, 0] = batch.labels["task_a"][:, 1] = -1
        batch.labels["task_a"][::3, 0] = -1  # uneven labelled rows per micro-batch
    results = []
    for k in (1, 4):
        # (plain SGD: Adam's normalisation would magnify rounding in near-zero gradients)
        step = make_train_step(quiet, optax.sgd(0.5), w, grad_accum=k, tasks=of_heads(quiet.tasks))
        state = TrainState.create(jax.tree.map(jnp.array, p0), optax.sgd(0.5).init(p0), w.init(2))
        for _ in range(2):  # famo and gradnorm move their state at the second step
            state, m = step(state, batch, jax.random.PRNGKey(0))
        results.append((state, m))
    (s1, m1) = results[0]
    for s, m in results[1:]:
        np.testing.assert_allclose(float(m.totals.loss), float(m1.totals.loss), rtol=1e-5)
        chex.assert_trees_all_close(m.totals.tasks, m1.totals.tasks, rtol=1e-5)
        chex.assert_trees_all_close(s.params, s1.params, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(s.weighting, s1.weighting, atol=1e-5, rtol=1e-5)
    assert not np.allclose(s1.params["heads"]["task_a"]["kernel"], params["heads"]["task_a"]["kernel"])


def test_lora_trains_only_adapters_and_heads_and_merges_exactly(setup, tiny_bert):
    from mtl_jax.model.lora import TARGETS, LoRA, merge_adapters, with_lora

    model, base_params = setup
    enc = load_encoder(tiny_bert)
    lora = LoRA(rank=4, alpha=8.0, targets=TARGETS)
    adapted = model.clone(config=with_lora(model.config, lora))
    params = init_params(adapted, enc.params, jax.random.PRNGKey(0))
    groups = set(jax.tree.leaves(param_groups(params)))
    assert "lora" in groups
    n_adapters = 2 * (4 * (32 + 32) * 4 + (32 + 64) * 4 + (64 + 32) * 4)  # 2 layers: q,k,v,out + ffn lin1, lin2
    assert group_sizes(params)["lora"] == n_adapters
    b = _batch()
    embed = lambda m, p: m.apply({"params": p}, b.ids, b.segments)[1]  # noqa: E731
    # B = 0 at the start: the pretrained function
    np.testing.assert_allclose(embed(adapted, params), embed(model, base_params), atol=1e-6)
    frozen = frozen_groups("lora", groups)
    assert frozen == {"embeddings", "layer_0", "layer_1"}
    tx, step = build_train_step(
        adapted, params, frozen, optim(100, lr=1e-2, head_lr=1e-2, lora_lr=1e-2), tasks=of_heads(adapted.tasks)
    )
    state = TrainState.create(jax.tree.map(jnp.array, params), tx.init(params))
    # optimizer state for the adapters and heads only: Adam's two moments of each (and a few counts)
    trainable = n_adapters + sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["heads"]))
    assert 2 * trainable <= count_numbers(state.opt_state) <= 2 * trainable + 64
    for i in range(3):
        state, _ = step(state, _batch(i), jax.random.PRNGKey(1))
    new = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    old = traverse_util.flatten_dict(params, sep="/")
    for path, value in new.items():
        if group_of(path) in frozen:
            np.testing.assert_array_equal(value, old[path], err_msg=path)  # bit for bit
        elif "lora_b" in path or path.startswith("heads/"):
            assert not np.array_equal(value, old[path]), path
    # the export's merged weights give the adapter forward
    merged = dict(state.params, encoder=merge_adapters(state.params["encoder"], lora))
    assert not any("lora" in k for k in traverse_util.flatten_dict(merged, sep="/"))
    trained = embed(adapted, state.params)
    assert not np.allclose(trained, embed(model, base_params), atol=1e-3)
    np.testing.assert_allclose(embed(model, merged), trained, atol=1e-5)


def test_lora_rank_16_trains_under_5_percent_of_minilm():
    from transformers import DistilBertConfig

    from mtl_jax.model.lora import TARGETS, LoRA, with_lora

    config = DistilBertConfig(dim=384, n_layers=6, n_heads=12, hidden_dim=1536)
    model = MultiTaskModel(with_lora(config, LoRA(rank=16, alpha=32.0, targets=TARGETS)), tasks=TASKS)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)["params"]
    sizes = {}
    for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items():
        sizes[group_of(path)] = sizes.get(group_of(path), 0) + int(np.prod(leaf.shape))
    encoder = sum(n for g, n in sizes.items() if not g.startswith("head:"))
    assert sizes["lora"] == 6 * (4 * 16 * (384 + 384) + 2 * 16 * (384 + 1536))
    assert sizes["lora"] / encoder < 0.05  # 2.9%
