"""Packing: the plan puts every sentence in exactly one slot, rows are nearly full, a packed
sentence gets the states and embedding it gets alone, and a packed training step is the
one-example-per-row step."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.data.batching import Grid, InputPipeline, pack_examples, plan_grids, single_rows
from mtl_jax.data.packing import MAX_SEGMENTS, pack_length, pack_rows, packed_calls, row_lengths
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.inference import load_encoder
from mtl_jax.model.encoder import Encoder, keep_mask
from mtl_jax.model.multitask import MultiTaskModel, init_params
from mtl_jax.training.steps import TrainState, make_loss_fn, make_train_step
from mtl_jax.training.weighting import make
from tests.helpers import by_task, of_heads


def test_pack_rows_places_every_sentence_once_in_nearly_full_rows():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(3, 60, 3000)) + [0, 2, 64, 64, 100]
    allowed = row_lengths(100)
    assert allowed == (64, 112) and row_lengths(20) == (24,) and row_lengths(600) == (64, 600)
    rows = pack_rows(lengths, allowed)
    placed = sorted(i for _, members in rows for i in members)
    assert placed == list(range(len(lengths)))
    for length, members in rows:
        assert length in allowed
        assert sum(lengths[i] for i in members) <= length
        assert 1 <= len(members) <= MAX_SEGMENTS
        # the row has the smallest allowed length that holds its longest sentence
        assert length == min(b for b in allowed if b >= max(lengths[i] for i in members))
    fill = sum(lengths) / sum(length for length, _ in rows)
    assert fill > 0.97, fill


def test_packed_calls_hold_each_sentence_with_positions_from_zero():
    rng = np.random.default_rng(1)
    ids = [rng.integers(5, 1000, n).astype(np.int32) for n in rng.integers(1, 100, 500)]
    calls = list(packed_calls(ids, batch_size=16, pad_id=0))
    seen = np.zeros(len(ids), int)
    for call in calls:
        rows, length = call.ids.shape
        assert rows == 16 * 24 // length  # rows of about 16 sentences' tokens; last call filled up
        for slot in np.flatnonzero(call.index >= 0):
            r, s = divmod(int(slot), MAX_SEGMENTS)
            where = call.segments[r] == s + 1
            i = call.index[slot]
            np.testing.assert_array_equal(call.ids[r][where], ids[i])
            np.testing.assert_array_equal(call.positions[r][where], np.arange(len(ids[i])))
            seen[i] += 1
        assert (call.ids[call.segments == 0] == 0).all()
    assert (seen == 1).all()
    assert {c.ids.shape for c in calls} == {(6, 64), (3, 112)}  # two shapes: one per row length
    # a short input is a short call, not a whole call of empty rows
    (single,) = packed_calls(ids[:1], batch_size=64, pad_id=0)
    assert single.ids.shape[0] == 1
    assert all(c.ids.shape[0] <= 4 for c in packed_calls(ids[:3], batch_size=64, pad_id=0))
    assert {c.ids.shape[0] for c in packed_calls(ids, batch_size=16, pad_id=0, row_multiple=4)} == {8, 4}


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_packed_rows_give_each_sentence_its_unpacked_states(sinusoidal):
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, sinusoidal_pos_embds=sinusoidal
    )
    module = FlaxDistilBertModule(config)
    params = module.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32), np.ones((1, 8), np.int32))["params"]
    rng = np.random.default_rng(2)
    sentences = [rng.integers(1, 100, n).astype(np.int32) for n in (7, 12, 3)]
    ids = np.zeros((2, 32), np.int32)
    positions = np.zeros((2, 32), np.int32)
    segments = np.zeros((2, 32), np.int32)
    slots = [(0, 0), (0, 7), (1, 5)]  # two sentences share row 0; row 1 has padding before its sentence
    for s, (sent, (r, start)) in enumerate(zip(sentences, slots)):
        ids[r, start : start + len(sent)] = sent
        positions[r, start : start + len(sent)] = np.arange(len(sent))
        segments[r, start : start + len(sent)] = s + 1
    encoder = Encoder(config)
    hidden = np.asarray(encoder.apply({"params": params}, ids, positions, segments))
    for sent, (r, start) in zip(sentences, slots):
        alone = module.apply({"params": params}, sent[None], np.ones((1, len(sent)), np.int32)).last_hidden_state[0]
        np.testing.assert_allclose(hidden[r, start : start + len(sent)], alone, atol=1e-5)
    # asked for a few tokens' states (each sentence's first, a middle one, a padding slot's 0),
    # the shortened last layer gives exactly those
    queries = np.array([[0, 7, 3], [5, 9, 0]], np.int32)
    some = np.asarray(encoder.apply({"params": params}, ids, positions, segments, queries=queries))
    assert some.shape == (2, 3, 32)
    np.testing.assert_allclose(some, np.take_along_axis(hidden, queries[..., None], axis=1), atol=1e-5)


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_encode_packed_equals_each_sentence_alone(minilm, mode):
    texts = [
        "",
        "short",
        "a somewhat longer sentence about a film",
        "naïve café — ünïcode",
        "x " * 300,
        "the plot",
        "ok",
    ]
    together = minilm.encode(texts, pooling=mode, normalize=False, batch_size=4)
    for i, text in enumerate(texts):
        np.testing.assert_allclose(together[i], minilm.encode([text], pooling=mode, normalize=False)[0], atol=2e-5)


def test_examples_of_three_texts_share_longer_rows_and_pairs_and_sentences_keep_64():
    rng = np.random.default_rng(0)
    texts = rng.integers(8, 26, (4000, 3))  # a query, a positive, a hard negative
    texts[:40] += 30  # a few long ones: rows of up to 128 tokens exist anyway
    assert pack_length(texts.sum(axis=1), widest=3) == 128  # 64-token rows hold one such example
    assert pack_length(texts[:, :2].sum(axis=1), widest=2) == 64
    assert pack_length(texts[:, 0], widest=1) == 64


def test_keep_mask_drops_at_the_rate_with_independent_draws_and_the_same_mask_for_more_rows():
    n = 1_000_001  # odd: the last word's second half is unused
    keep, keep_prob = keep_mask(jax.random.PRNGKey(3), (n,), 0.1)
    keep = np.asarray(keep)
    assert keep_prob == 1 - 6554 / 65536
    sigma = np.sqrt(0.1 * 0.9 / n)
    assert abs((1 - keep.mean()) - 0.1) < 5 * sigma
    # the two 16-bit halves of a word are independent draws: both dropped ~1% of pairs
    pairs = keep[: n - 1].reshape(-1, 2)
    both = (~pairs[:, 0] & ~pairs[:, 1]).mean()
    assert abs(both - 0.01) < 5 * np.sqrt(0.01 * 0.99 / len(pairs))
    other, _ = keep_mask(jax.random.PRNGKey(4), (n,), 0.1)
    assert (np.asarray(other) != keep).mean() > 0.15  # another key, another mask
    # a typed key works too; 0.25 is exact in 16 bits
    typed, p = keep_mask(jax.random.key(3), (7, 5), 0.25)
    assert typed.shape == (7, 5) and p == 0.75
    # more rows (a grid rounded up for more devices) leave the first rows' mask as it was
    rows, _ = keep_mask(jax.random.PRNGKey(3), (11, 7, 5), 0.5)
    more, _ = keep_mask(jax.random.PRNGKey(3), (12, 7, 5), 0.5)
    assert (np.asarray(more[:11]) == np.asarray(rows)).all()


def _labelled(rng, n: int, long: int = 0) -> Tokenized:
    """``n`` examples whose tokens all equal their index + 1 (a slot's tokens name its example),
    two tasks with some labels missing, ``long`` of them longer than the short rows."""
    lengths = rng.integers(3, 60, n)
    lengths[rng.choice(n, long, replace=False)] = rng.integers(65, 150, long)
    labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], 1).astype(np.int32)
    labels[rng.random(n) < 0.4, 0] = -1
    labels[labels[:, 0] >= 0, 1] = np.where(rng.random(int((labels[:, 0] >= 0).sum())) < 0.5, -1, 1)
    ids = [np.full(k, i + 1, np.int32) for i, k in enumerate(lengths)]
    return Tokenized(ids, by_task(labels), (labels[:, 0] < 0).astype(np.int32), 0)


def _examples_in(arrays: dict, data: Tokenized) -> list[int]:
    """The examples a packed batch holds, read back from its tokens; checks positions and labels."""
    found = []
    ids, positions, segments, labels = arrays.ids, arrays.positions, arrays.segments, arrays.labels
    for r in range(ids.shape[0]):
        for s in range(MAX_SEGMENTS):
            where = segments[r] == s + 1
            if not where.any():
                assert all((y[r, s] == -1).all() for y in labels.values())
                continue
            i = int(ids[r][where][0]) - 1
            np.testing.assert_array_equal(ids[r][where], data.ids[i])
            np.testing.assert_array_equal(positions[r][where], np.arange(len(data.ids[i])))
            for name, y in labels.items():
                np.testing.assert_array_equal(y[r, s], data.labels[name][i])
            found.append(i)
    assert (ids[segments == 0] == 0).all()
    return found


@pytest.mark.parametrize("task_stacked", [False, True])
def test_training_batches_hold_every_planned_example_once_with_its_labels(task_stacked):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        data = _labelled(rng, 700, long=12)
        pipeline = InputPipeline({"train": data}, 0, 256, 32, 32, seed=seed, task_stacked=task_stacked)
        pipeline.steps = 3 * len(pipeline.plan(0))
        shapes = set()
        for epoch in range(3):
            for step in pipeline.plan(epoch):
                arrays = pipeline.train_batch(step)
                shapes.add(arrays.ids.shape)
                parts = step if task_stacked else [step]
                for t, part in enumerate(parts):
                    sub = jax.tree.map(lambda v: v[:, t], arrays) if task_stacked else arrays
                    assert sorted(_examples_in(sub, data)) == sorted(part.tolist())
        assert len(shapes) <= 2 and len(pipeline.grids) <= 2
        assert {g.length for g in pipeline.grids.values()} == {64, 160}


def test_evaluation_batches_hold_every_example_once():
    rng = np.random.default_rng(5)
    data = _labelled(rng, 300, long=5)
    pipeline = InputPipeline({"test": data}, 0, 256, 32, 32, seed=0)
    seen = []
    for call, arrays in pipeline.eval_batches(data):
        found = _examples_in(arrays, data)
        assert sorted(found) == sorted(call.index[call.index >= 0].tolist())
        seen += found
    assert sorted(seen) == list(range(300))


def test_packed_step_equals_the_one_example_per_row_step(tiny_bert):
    """Same examples, packed several to a row or one per padded row: same losses, gradients and
    updated parameters (dropout off)."""
    import copy

    import optax

    enc = load_encoder(tiny_bert)
    config = copy.deepcopy(enc.config)
    config.dropout = config.attention_dropout = 0.0
    rng = np.random.default_rng(7)
    data = _labelled(rng, 24)
    data.ids = [rng.integers(1000, 30000, len(s)).astype(np.int32) for s in data.ids]
    idx = np.arange(24)
    packed, _ = pack_examples(data, idx, Grid(rows=24, length=64), pad_id=0)
    assert (packed.segments.max(axis=1) > 1).sum() >= 3  # several rows really share
    length = max(len(s) for s in data.ids)
    padded_ids = np.zeros((24, length), np.int32)
    mask = np.zeros((24, length), np.int32)
    for i, s in enumerate(data.ids):
        padded_ids[i, : len(s)], mask[i, : len(s)] = s, 1
    single = single_rows(padded_ids, mask, data.labels)
    for pooling in ("mean", "cls"):
        model = MultiTaskModel(config, tasks=(("task_a", 3), ("task_b", 2)), pooling=pooling, head_dropout=0.0)
        params = init_params(model, enc.params, jax.random.PRNGKey(0))
        terms_fn = make_loss_fn(model, of_heads(model.tasks))
        loss_fn = lambda p, b, k: (terms_fn(p, b, k)[0] @ jnp.array([1.0, 0.5]), None)  # noqa: E731
        value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss_p, _), grads_p = value_and_grad(params, packed, None)
        (loss_s, _), grads_s = value_and_grad(params, single, None)
        np.testing.assert_allclose(loss_p, loss_s, rtol=1e-6)
        chex.assert_trees_all_close(grads_p, grads_s, atol=1e-5, rtol=1e-5)
        step = jax.jit(make_train_step(model, optax.sgd(0.5), make("static", (1.0, 0.5)), tasks=of_heads(model.tasks)))
        after = []
        for batch in (packed, single):
            state = TrainState.create(jax.tree.map(jnp.array, params), optax.sgd(0.5).init(params))
            state, m = step(state, batch, jax.random.PRNGKey(1))
            after.append(state.params)
            assert int(m.totals.tasks["task_a"].count) == int((data.labels["task_a"] >= 0).sum())
        chex.assert_trees_all_close(after[0], after[1], atol=1e-5)


def test_grids_hold_the_steps_the_run_takes_and_no_more():
    data = _labelled(np.random.default_rng(3), 700, long=12)
    pipeline = InputPipeline({"train": data}, 0, 256, 32, 32, seed=0)
    per_epoch = len(pipeline.plan(0))
    pipeline.steps = per_epoch + 5  # into the second epoch
    plans = list(pipeline.run_plans())
    assert [len(p) for p in plans] == [per_epoch, 5]
    assert all(np.array_equal(a, b) for a, b in zip(plans[1], pipeline.plan(1)[:5]))
    # the first two steps alone: their own (smaller or equal) grids, sized from them alone
    short = InputPipeline({"train": data}, 0, 256, 32, 32, seed=0, steps=2)
    assert short.grids == plan_grids(data, [pipeline.plan(0)[:2]], task_stacked=False)
    assert sum(g.rows * g.length for g in short.grids.values()) < sum(
        g.rows * g.length for g in pipeline.grids.values()
    )


@pytest.mark.parametrize("task_stacked", [False, True])
def test_a_long_run_sizes_its_grids_from_a_sample_and_grows_them_as_a_resumed_run_does(task_stacked, monkeypatch):
    """Past GRID_SAMPLE steps the grids come from a seeded sample of epoch 0 (no other window is dealt);
    a step that needs more rows grows its grid (told once); a pipeline restored from a checkpoint's
    grids has, at every later step, the shapes of the run that was not interrupted."""
    monkeypatch.setattr(InputPipeline, "GRID_SAMPLE", 6)
    data = _labelled(np.random.default_rng(5), 1500, long=30)
    wide = np.flatnonzero(data.source == 1)  # one task's texts fill a row each: its steps need more rows
    data.ids = [np.full(50 + i % 14, i + 1, np.int32) if i in set(wide.tolist()) else u for i, u in enumerate(data.ids)]
    told = []

    def pipeline(log=lambda line: None):
        return InputPipeline({"train": data}, 0, 256, 8, 32, seed=2, task_stacked=task_stacked, log=log, devices=2)

    whole = pipeline(told.append)
    plan = whole.plan(0)
    assert len(plan) > 3 * whole.GRID_SAMPLE
    sampled = dict(whole.grids)
    if not task_stacked:  # (task-stacked plans are dealt whole; an epoch plan deals the sampled windows alone)
        assert len(plan.dealt) == 1 and len(plan.spans) == 4
    exact = plan_grids(data, [plan], task_stacked, row_multiple=2)
    assert all(sampled[n].rows <= exact[n].rows for n in sampled) and sampled != exact
    shapes, saved = [], {}
    for k in range(len(plan)):
        shapes.append(whole.train_batch(plan[k]).shape)
        if k == len(plan) // 2:
            saved = whole.grid_rows()
    assert all(whole.grids[n].rows >= exact[n].rows for n in exact)
    assert 0 < len(told) <= 2 * len(exact) and all("one more compiled shape" in line for line in told)
    resumed = pipeline()
    resumed.restore_grids(saved)
    assert resumed.grid_rows() == saved != {str(n): g.rows for n, g in sampled.items()}
    again = [resumed.train_batch(resumed.plan(0)[k]).shape for k in range(len(plan) // 2 + 1, len(plan))]
    assert again == shapes[len(plan) // 2 + 1 :]


@pytest.mark.parametrize("task_stacked", [False, True])
def test_each_process_packs_its_own_rows_and_together_they_make_the_whole_batch(task_stacked):
    """Each process of a multi-process run reads and packs only the examples of its block of rows;
    the blocks side by side are the batch one process builds."""
    data = _labelled(np.random.default_rng(4), 700, long=12)
    whole = InputPipeline({"train": data}, 0, 256, 32, 32, seed=1, devices=2, task_stacked=task_stacked)
    halves = [
        InputPipeline({"train": data}, 0, 256, 32, 32, seed=1, devices=2, task_stacked=task_stacked, host=(h, 2))
        for h in range(2)
    ]
    for step in whole.plan(0)[:6]:
        one = whole.train_batch(step)
        two = [p.train_batch(step) for p in halves]
        joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), *two)
        jax.tree.map(np.testing.assert_array_equal, joined, one)
        for part, task in zip(step if task_stacked else [step], range(2 if task_stacked else 1)):
            held = [set(_examples_in(jax.tree.map(lambda v: v[:, task], b) if task_stacked else b, data)) for b in two]
            assert not held[0] & held[1] and held[0] | held[1] == set(part.tolist())
            assert held[0] and held[1]  # both processes had work
