"""Packed inference: the plan puts every sentence in exactly one slot, rows are nearly full,
and a packed sentence gets the states and embedding it gets alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.encoder import Encoder, keep_mask
from mtl_jax.packing import MAX_SEGMENTS, pack_rows, packed_calls, row_lengths


def test_pack_rows_places_every_sentence_once_in_nearly_full_rows():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(3, 60, 3000)) + [0, 2, 64, 64, 100]
    allowed = row_lengths(128)
    assert allowed[0] == 64 and allowed[-1] == 128
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
    calls = list(packed_calls(ids, max_length=128, batch_size=16, pad_id=0))
    seen = np.zeros(len(ids), int)
    for call in calls:
        rows, length = call.ids.shape
        assert rows == max(1, 16 * 24 // length)  # rows of about 16 sentences' tokens; last call filled up
        for slot in np.flatnonzero(call.index >= 0):
            r, s = divmod(int(slot), MAX_SEGMENTS)
            where = call.segments[r] == s + 1
            i = call.index[slot]
            np.testing.assert_array_equal(call.ids[r][where], ids[i])
            np.testing.assert_array_equal(call.positions[r][where], np.arange(len(ids[i])))
            seen[i] += 1
        assert (call.ids[call.segments == 0] == 0).all()
    assert (seen == 1).all()
    assert len({c.ids.shape for c in calls}) <= len(row_lengths(128))  # one shape per row length
    # a short input is a short call, not a whole call of empty rows
    (single,) = packed_calls(ids[:1], max_length=128, batch_size=64, pad_id=0)
    assert single.ids.shape[0] == 1
    assert all(c.ids.shape[0] <= 4 for c in packed_calls(ids[:3], max_length=128, batch_size=64, pad_id=0))


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


def test_keep_mask_drops_at_the_rate_with_independent_halves():
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
