"""The task types beyond classification: each loss against a NumPy reference, each metric against the
library that defines it (scipy, seqeval) or a hand count, pairs through packed rows, readers
(Parquet, datasets folders, CoNLL), bad input per type, and one run of all seven types that learns
and predicts from its export."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import load
from mtl_jax.config import TaskConfig
from mtl_jax.data.load import load_tasks
from mtl_jax.data.text import Words
from mtl_jax.errors import MtlError
from mtl_jax.tasks import build
from mtl_jax.tasks.base import has_label
from mtl_jax.tasks.metrics import correlations, entity_scores, matthews, retrieval_metrics
from mtl_jax.tasks.retrieval import SCALE
from mtl_jax.tasks.similarity import COSENT_SCALE
from tests.helpers import cli
from tests.typed_data import write_typed_data


def _task(type_, **kw):
    return build(TaskConfig("t", "x", type=type_, **kw))


def test_cosent_and_mse_similarity_losses_against_numpy():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, 6).astype(np.float32)
    score = np.array([0.0, 5.0, 2.5, np.nan, 1.0, 5.0], np.float32)  # NaN: no label
    task = _task("similarity", text_columns=("a", "b"), score_range=(0.0, 5.0)).with_labels([])
    sums = task.loss_sums(jnp.asarray(cos)[None, :, None], jnp.asarray(score)[None])
    ok = ~np.isnan(score)
    s = np.where(ok, score, 0) / 5
    terms = [COSENT_SCALE * (cos[j] - cos[i]) for i in range(6) for j in range(6) if ok[i] and ok[j] and s[i] > s[j]]
    want = math.log(1 + sum(math.exp(t) for t in terms))
    assert float(sums.loss_sum) / int(sums.count) == pytest.approx(want, rel=1e-5)
    mse = _task("similarity", text_columns=("a", "b"), score_range=(0.0, 5.0), loss="mse").with_labels([])
    got = mse.loss_sums(jnp.asarray(cos)[None, :, None], jnp.asarray(score)[None])
    assert float(got.loss_sum) == pytest.approx(float(np.sum((cos[ok] - s[ok]) ** 2)), rel=1e-5)


def test_in_batch_negatives_loss_with_hard_negatives_masks_the_ones_a_row_lacks_against_numpy():
    rng = np.random.default_rng(1)
    out = rng.normal(size=(5, 4, 8)).astype(np.float32)  # query, positive, two hard negatives
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    texts = np.array([4, 3, 0, 2, 4])  # row 1 has one negative, row 3 none, row 2 no label
    task = _task("retrieval", text_columns=("q", "p", "n1", "n2"))
    keys = np.arange(20).reshape(5, 4)
    labels = np.where(texts[:, None] > 0, np.concatenate([keys, texts[:, None]], axis=1), -1)  # [5, 5]
    sums = task.loss_sums(jnp.asarray(out)[None], jnp.asarray(labels)[None])
    cands = np.stack([out[i, j] for j in (1, 2, 3) for i in range(5) if j < texts[i]])  # what each query meets
    want = 0.0
    for i in np.flatnonzero(texts):
        z = SCALE * cands @ out[i, 0]
        own = SCALE * out[i, 1] @ out[i, 0]
        want += np.log(np.exp(z - z.max()).sum()) + z.max() - own
    assert len(cands) == 4 + 5 and float(sums.loss_sum) == pytest.approx(want, rel=1e-5) and int(sums.count) == 4


@pytest.mark.parametrize("guide", ["self", "initial"])
def test_guided_in_batch_loss_leaves_out_candidates_scored_above_the_positive_against_numpy(guide):
    """The guide (the model itself, or the starting encoder's embeddings after the model's in the head
    output) decides which candidates are left out; the model's own cosines are scored."""
    rng = np.random.default_rng(2)
    out = rng.normal(size=(6, 3, 8)).astype(np.float32)  # query, positive, one hard negative
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    g = out.copy() if guide == "self" else rng.normal(size=(6, 3, 8)).astype(np.float32)
    g[3, 2] = g[3, 0] + 0.05 * rng.normal(size=8)  # a "negative" that is really a positive, to the guide
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    if guide == "self":
        out = g
    texts = np.array([3, 3, 2, 3, 3, 0])
    labels = np.where(texts[:, None] > 0, np.concatenate([np.arange(24).reshape(6, 4), texts[:, None]], 1), -1)
    margin = 0.1
    task = _task("retrieval", text_columns=("q", "p", "n"), guide=guide, guide_margin=margin)
    head_out = out if guide == "self" else np.concatenate([out, g], axis=-1)
    sums = task.loss_sums(jnp.asarray(head_out)[None], jnp.asarray(labels)[None])
    cands = [(j, i) for j in (1, 2) for i in range(6) if j < texts[i]]
    want, left_out = 0.0, 0
    for q in np.flatnonzero(texts):
        own = out[q, 1] @ out[q, 0]
        cos = np.array([out[i, j] @ out[q, 0] for j, i in cands])
        guide_cos = np.array([g[i, j] @ g[q, 0] for j, i in cands])
        keep = np.array([(j, i) == (1, q) or c <= g[q, 1] @ g[q, 0] - margin for (j, i), c in zip(cands, guide_cos)])
        left_out += int((~keep).sum())
        z = SCALE * cos[keep]
        want += np.log(np.exp(z - z.max()).sum()) + z.max() - SCALE * own
    assert left_out >= 1  # (row 3's planted negative at least)
    assert float(sums.loss_sum) == pytest.approx(want, rel=1e-5) and int(sums.count) == 5
    plain = _task("retrieval", text_columns=("q", "p", "n")).loss_sums(
        jnp.asarray(out)[None], jnp.asarray(labels)[None]
    )
    assert float(plain.loss_sum) != pytest.approx(float(sums.loss_sum), rel=1e-4)
    if guide == "initial":  # predictions and values are the model's own embeddings
        np.testing.assert_array_equal(task.predict(jnp.asarray(head_out)[None]), out[None])
    with pytest.raises(MtlError, match="unknown guide"):
        _task("retrieval", text_columns=("q", "p"), guide="teacher")


def _numpy_in_batch(out: np.ndarray) -> float:
    """Sum over queries of MNRL's cross-entropy, every example with a positive and no negative."""
    z = SCALE * out[:, 0] @ out[:, 1].T
    return float(sum(np.log(np.exp(row - row.max()).sum()) + row.max() - row[i] for i, row in enumerate(z)))


def test_matryoshka_loss_adds_each_leading_size_renormalised_and_metrics_report_each_size():
    rng = np.random.default_rng(3)
    out = rng.normal(size=(5, 2, 8)).astype(np.float32)
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    labels = np.concatenate([np.arange(20).reshape(5, 4), np.full((5, 1), 2)], axis=1)
    task = _task("retrieval", text_columns=("q", "p"), matryoshka_dims=[2, 8, 4])
    assert task.dims == (8, 4, 2)  # largest first; 8, the whole embedding, counted once
    sums = task.loss_sums(jnp.asarray(out)[None], jnp.asarray(labels)[None])
    cut = lambda d: out[..., :d] / np.linalg.norm(out[..., :d], axis=-1, keepdims=True)  # noqa: E731
    want = _numpy_in_batch(out) + _numpy_in_batch(cut(4)) + _numpy_in_batch(cut(2))
    assert float(sums.loss_sum) == pytest.approx(want, rel=1e-5)
    result = task.metrics(labels, out)
    assert result["ndcg@10@8"] == result["ndcg@10"]
    keys = (labels[:, :2], labels[:, 2:4])
    assert result["ndcg@10@2"] == pytest.approx(retrieval_metrics(cut(2)[:, 0], cut(2)[:, 1], *keys)["ndcg@10"])
    assert "ndcg@10@4" in task.record_keys
    with pytest.raises(MtlError, match="exceed the encoder's 4 dimensions"):
        task.check_encoder(4)
    # weights, largest size first (the whole embedding's listed: its loss weighed once)
    weighed = _task("retrieval", text_columns=("q", "p"), matryoshka_dims=[2, 8, 4], matryoshka_weights=[0.5, 2, 3])
    sums = weighed.loss_sums(jnp.asarray(out)[None], jnp.asarray(labels)[None])
    want = 0.5 * _numpy_in_batch(out) + 2 * _numpy_in_batch(cut(4)) + 3 * _numpy_in_batch(cut(2))
    assert float(sums.loss_sum) == pytest.approx(want, rel=1e-5)
    with pytest.raises(MtlError, match="one weight per size of matryoshka_dims"):
        _task("retrieval", text_columns=("q", "p"), matryoshka_dims=[8, 4], matryoshka_weights=[1])
    with pytest.raises(ValueError, match="positive whole numbers"):  # (a config file says it as file: task: reason)
        _task("retrieval", text_columns=("q", "p"), matryoshka_dims=[0, 4])


def test_similarity_matryoshka_adds_cosent_of_each_size_and_reports_spearman_at_each():
    from mtl_jax.model.heads import Features

    rng = np.random.default_rng(4)
    pooled = rng.normal(size=(1, 12, 8)).astype(np.float32)  # six pairs in one row: slots 0/1, 2/3, ...
    score = rng.uniform(0, 5, 6).astype(np.float32)
    task = _task("similarity", text_columns=("a", "b"), score_range=[0, 5], matryoshka_dims=[4, 2]).with_labels([])
    outputs = task.head(task.head_spec(), Features(jnp.asarray(pooled), jnp.asarray(pooled), None))[:, ::2]
    cut = lambda d: pooled[0, :, :d] / np.linalg.norm(pooled[0, :, :d], axis=-1, keepdims=True)  # noqa: E731
    cos = {d: np.sum(cut(d)[::2] * cut(d)[1::2], axis=-1) for d in (8, 4, 2)}
    np.testing.assert_allclose(np.asarray(outputs)[0], np.stack([cos[8], cos[4], cos[2]], axis=-1), atol=1e-6)

    def numpy_cosent(c):  # log(1 + sum over score_i > score_j of exp(20 (c_j - c_i)))
        terms = [np.exp(20 * (c[j] - c[i])) for i in range(6) for j in range(6) if score[i] > score[j]]
        return np.log1p(np.sum(terms))

    sums = task.loss_sums(outputs, jnp.asarray(score)[None])
    assert float(sums.loss_sum) == pytest.approx(6 * sum(numpy_cosent(cos[d]) for d in (8, 4, 2)), rel=1e-5)
    weighed = _task(
        "similarity", text_columns=("a", "b"), score_range=[0, 5], matryoshka_dims=[4, 2], matryoshka_weights=[2, 3]
    ).with_labels([])
    want = 6 * (numpy_cosent(cos[8]) + 2 * numpy_cosent(cos[4]) + 3 * numpy_cosent(cos[2]))
    assert float(weighed.loss_sums(outputs, jnp.asarray(score)[None]).loss_sum) == pytest.approx(want, rel=1e-5)
    result = task.metrics(score, np.asarray(task.predict(outputs))[0])
    assert result["spearman"] == pytest.approx(correlations(score, cos[8])["spearman"])
    assert result["spearman@2"] == pytest.approx(correlations(score, cos[2])["spearman"])
    assert "spearman@4" in task.record_keys and task.values(outputs).shape == (1, 6, 1)
    with pytest.raises(MtlError, match="matryoshka_dims needs encoding: bi"):
        _task("similarity", text_columns=("a", "b"), encoding="cross", matryoshka_dims=[4])


def test_hard_negatives_come_from_columns_and_a_list_and_a_row_with_fewer_is_not_padded():
    task = _task("retrieval", text_columns=("q", "p", "n"), negatives_column="more")
    assert task.text_columns() == ("q", "p") and task.optional_columns() == ("n", "more")
    full = {"q": "a", "p": "b", "n": "c", "more": ("d", "e")}
    assert task.text(full) == ("a", "b", "c", "d", "e") and task.raw_label(full)[4] == 5
    short = {"q": "a", "p": "b", "n": " ", "more": ("d",)}
    assert task.text(short) == ("a", "b", "d") and task.label_id(task.raw_label(short))[4] == 3
    assert task.with_labels([task.raw_label(full), task.raw_label(short)]).width == 5
    assert "at most 14" in task.text({"q": "a", "p": "b", "more": tuple("n" * 15)})
    with pytest.raises(MtlError, match="up to 14 hard negative columns"):
        _task("retrieval", text_columns=("q",))


def test_hard_negatives_load_from_csv_columns_and_jsonl_lists_and_evaluation_files_need_none(tmp_path):
    (tmp_path / "train.csv").write_text("q,p,negative_1,negative_2\nq1,p1,n1,n2\nq2,p2,n3,\nq3,p3,,\n")
    (tmp_path / "train.jsonl").write_text(
        '{"q": "q1", "p": "p1", "neg": ["n1", "n2", "n3"]}\n{"q": "q2", "p": "p2", "neg": []}\n{"q": "q3", "p": "p3"}\n'
    )
    (tmp_path / "eval.jsonl").write_text('{"q": "q4", "p": "p4"}\n{"q": "q5", "p": "p5"}\n')
    eval_files = {"validation": str(tmp_path / "eval.jsonl"), "test": str(tmp_path / "eval.jsonl")}
    columns = TaskConfig(
        "c",
        str(tmp_path / "train.csv"),
        type="retrieval",
        text_columns=("q", "p", "negative_1", "negative_2"),
        **eval_files,
    )
    listed = TaskConfig(
        "l",
        str(tmp_path / "train.jsonl"),
        type="retrieval",
        text_columns=("q", "p"),
        negatives_column="neg",
        **eval_files,
    )
    for config, widths, widest in ((columns, [4, 3, 2], 4), (listed, [5, 2, 2], 5)):
        data = load_tasks([config])
        (task,) = data.tasks
        assert [len(t) for t in data.splits["train"].texts] == widths and task.width == widest
        assert data.splits["train"].labels[task.name][:, 4].tolist() == widths
        assert [len(t) for t in data.splits["test"].texts] == [2, 2]


def test_multilabel_and_regression_losses_against_numpy():
    task = _task("multilabel", labels=("a", "b", "c"))
    z = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0], [9.0, 9.0, 9.0]], np.float32)
    y = np.array([[1, 0, 1], [0, 0, 0], [-1, -1, -1]], np.int8)  # the last: no label
    sums = task.loss_sums(jnp.asarray(z)[None], jnp.asarray(y)[None])
    p = 1 / (1 + np.exp(-z[:2]))
    want = -np.mean(y[:2] * np.log(p) + (1 - y[:2]) * np.log(1 - p), axis=1).sum()
    assert float(sums.loss_sum) == pytest.approx(want, rel=1e-5) and int(sums.count) == 2
    assert task.label_id("a").tolist() == [1, 0, 0] and "not in the labels" in task.label_id(("a", "x"))
    reg = _task("regression").with_labels(["1", "2", "3", "4"])
    mean, std = np.mean([1, 2, 3, 4]), np.std([1, 2, 3, 4])
    out = jnp.asarray([[[0.5], [-1.0], [7.0]]])
    got = reg.loss_sums(out, jnp.asarray([[2.0, 4.0, np.nan]]))
    want = (0.5 - (2 - mean) / std) ** 2 + (-1.0 - (4 - mean) / std) ** 2
    assert float(got.loss_sum) == pytest.approx(want, rel=1e-5) and int(got.count) == 2
    np.testing.assert_allclose(reg.predict(out)[0, :2], [0.5 * std + mean, -std + mean], rtol=1e-6)


def test_entity_f1_matches_seqeval_on_random_tag_sequences():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    for scheme in (
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],  # BIO
        ["O", "I-PER", "I-LOC", "B-LOC", "I-MISC"],  # IOB1
        ["O", "B-PER", "I-PER", "E-PER", "S-LOC", "B-LOC", "E-LOC"],  # IOBES
        ["O", "B-PER", "I-PER", "L-PER", "U-LOC", "B-LOC", "L-LOC"],  # BILOU
        ["O", "B-PER", "I-PER", "X", "B-LOC", "PER"],  # unprefixed tags beside prefixed ones
        ["O", "B-NEW-YORK", "I-NEW-YORK", "S-X-Y"],  # types with hyphens
    ):
        for _ in range(300):
            true = [[str(t) for t in rng.choice(scheme, rng.integers(1, 12))] for _ in range(rng.integers(1, 5))]
            pred = [[str(t) for t in rng.choice(scheme, len(s))] for s in true]
            got = entity_scores(true, pred)
            want = [seqeval.precision_score(true, pred), seqeval.recall_score(true, pred), seqeval.f1_score(true, pred)]
            np.testing.assert_allclose(
                [got["entity_precision"], got["entity_recall"], got["entity_f1"]], want, atol=1e-12
            )


def test_correlations_mcc_and_ranking_against_references():
    from scipy import stats

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40), rng.normal(size=40)
    b[:5] = b[5]  # ties
    got = correlations(a, b)
    assert got["pearson"] == pytest.approx(stats.pearsonr(a, b)[0]) and got["spearman"] == pytest.approx(
        stats.spearmanr(a, b)[0]
    )
    assert correlations(a, np.ones(40))["spearman"] == 0.0  # undefined: 0, not NaN
    # Matthews: 2 classes against the textbook formula
    c = np.array([[5, 2], [1, 7]])
    tn, fp, fn, tp = c.ravel()
    want = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(c) == pytest.approx(want)
    # ranking, hand counted (distinct texts: every query has one relevant passage)
    q = np.array([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0.6, 0.1]])
    p = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0.9, 0.1, 0.3]])
    r = retrieval_metrics(q, p, ["q0", "q1", "q2"], ["p0", "p1", "p2"])
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    ranks = [int((sims[i] > sims[i, i]).sum()) for i in range(3)]
    assert ranks == [0, 0, 1]
    assert r["recall@1"] == pytest.approx(np.mean([k == 0 for k in ranks]))
    assert r["mrr@10"] == pytest.approx(np.mean([1 / (k + 1) for k in ranks]))
    assert r["ndcg@10"] == pytest.approx(np.mean([1 / np.log2(k + 2) for k in ranks]))


def test_retrieval_groups_repeated_passages_and_queries_with_several_positives():
    """A passage written twice is one document; a query with two positives has both relevant; a tie
    goes to the passage seen first."""
    e = np.eye(4)
    queries = np.array([e[0], e[0], e[1], e[2]])  # query "a" twice (positives "p" and "s"), "b", "c"
    positives = np.array([e[0], e[3], e[1], e[1]])  # "p", "s", and "x" written twice (for "b" and for "c")
    r = retrieval_metrics(queries, positives, ["a", "a", "b", "c"], ["p", "s", "x", "x"])
    # a: p (1.0), then s and x tie at 0: s seen first -> ranks 1, 2 relevant. b: x first.
    # c: every passage at 0: p, s, x in the order seen -> x third.
    assert r["examples"] == 3
    assert r["recall@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert r["mrr@10"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert r["ndcg@10"] == pytest.approx((1 + 1 + 1 / np.log2(4)) / 3)
    assert r["map@100"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_evaluation_ranks_the_rows_hard_negatives_with_the_passages():
    """A test row's hard negatives join the corpus, relevant to no query: one that outscores the
    query's positive pushes it down; a negative written as another row's positive is that one
    document; a row's label carries its negatives' keys and the task ranks them."""
    e = np.eye(4)
    queries, positives = np.array([e[0], e[1]]), np.array([e[0] + e[2], e[1]])
    alone = retrieval_metrics(queries, positives, ["a", "b"], ["p", "x"])
    assert alone["recall@1"] == 1
    # "a"'s negative "n" (along e0 alone) beats its positive; "b"'s negative is "p", a's positive
    ranked = retrieval_metrics(queries, positives, ["a", "b"], ["p", "x"], np.array([e[0], e[0] + e[2]]), ["n", "p"])
    assert ranked["recall@1"] == 0.5  # b still first: "p" is a's positive, one document, no copy
    assert ranked["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    task = _task("retrieval", text_columns=("q", "p", "n"))
    task = task.with_labels([task.raw_label({"q": "a", "p": "p", "n": "n"})])
    assert task.label_shape == (7,)
    y = np.stack([task.label_id(task.raw_label(f)) for f in ({"q": "a", "p": "p", "n": "n"}, {"q": "b", "p": "x"})])
    assert y[1, 4] == 2 and (y[1, 5:] == -1).all()  # b has no negative: nothing of it is ranked
    out = np.stack([np.stack([e[0], e[0] + e[2], e[0]]), np.stack([e[1], e[1], e[3]])])
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    got = task.metrics(y, out)
    assert got["recall@1"] == 0.5 and got["mrr@10"] == pytest.approx(0.75)


def test_ranking_in_chunks_equals_the_whole_matrix(monkeypatch):
    """Queries are ranked a few at a time (memory chunk x passages): the figures are the whole matrix's."""
    from mtl_jax.tasks import metrics

    rng = np.random.default_rng(0)
    q = rng.normal(size=(300, 8))
    p = q + 2 * rng.normal(size=(300, 8))
    keys = [f"p{i}" for i in range(300)]
    keys[7] = keys[3]  # a passage written twice
    whole = metrics.retrieval_metrics(q, p, [f"q{i}" for i in range(300)], keys)
    monkeypatch.setattr(metrics, "RANK_CHUNK_NUMBERS", 299 * 7)  # 7 queries a chunk, the last one short
    assert metrics.retrieval_metrics(q, p, [f"q{i}" for i in range(300)], keys) == whole
    assert 0 < whole["recall@1"] < 1


def test_pair_embeddings_through_packed_rows_equal_each_sentence_alone(minilm):
    from mtl_jax.data.batching import Grid, pack_examples
    from mtl_jax.data.text import Segments
    from mtl_jax.data.tokenized import Tokenized
    from mtl_jax.model.multitask import MultiTaskModel

    pairs = [
        ("A man is playing a guitar.", "Someone plays music."),
        ("Cats sleep.", "The stock market fell sharply today."),
    ]
    pairs += [(f"short {i}", f"another sentence number {i} here") for i in range(9)]
    enc = minilm.tokenizer.encode_examples([Segments(p) for p in pairs], 128)
    data = Tokenized(enc.ids, {"t": np.ones(len(pairs), np.int32)}, np.zeros(len(pairs), np.int32), 0)
    batch, call = pack_examples(data, np.arange(len(pairs)), Grid(8, 64), minilm.tokenizer.pad_id)
    assert (batch.segments.max(axis=1) > 2).any()  # rows hold several pairs
    model = MultiTaskModel(minilm.config, tasks=(), pooling="mean")
    pooled = model.apply(
        {"params": {"encoder": minilm.params}}, batch.ids, batch.positions, batch.segments, 16, method="embed_packed"
    )
    pooled = np.asarray(pooled).reshape(-1, pooled.shape[-1])
    alone = minilm.encode([s for p in pairs for s in p], normalize=False).reshape(len(pairs), 2, -1)
    keep = call.index >= 0
    np.testing.assert_allclose(pooled[keep], alone[call.index[keep], call.part[keep]], atol=1e-5)


def test_readers_parquet_datasets_folder_and_conll(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = {"text": ["good film", "bad film", "fine film", "awful film"] * 5, "label": [1, 0, 1, 0] * 5}
    pq.write_table(pa.table(rows), tmp_path / "a.parquet")
    folder = tmp_path / "ds"
    folder.mkdir()
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", pa.table(rows).schema) as w:
        w.write_table(pa.table(rows))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    features = {"text": {"_type": "Value"}, "label": {"_type": "ClassLabel", "names": ["neg", "pos"]}}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    data = load_tasks([TaskConfig("p", str(tmp_path / "a.parquet")), TaskConfig("d", str(folder))])
    assert data.labels == {"p": ("0", "1"), "d": ("neg", "pos")}  # ClassLabel ids read as their names
    assert sum(len(s) for s in data.splits.values()) == 40
    with pytest.raises(Exception, match=r"a\.parquet: no column 'review'"):
        load_tasks([TaskConfig("p", str(tmp_path / "a.parquet"), text_column="review")])
    with pytest.raises(Exception, match=r"ds: no column 'stars'"):
        load_tasks([TaskConfig("d", str(folder), label_column="stars")])
    (tmp_path / "x.conll").write_text("-DOCSTART- O\n\nJohn B-PER\nruns O\n\nMary B-PER\n")
    data = load_tasks([TaskConfig("n", str(tmp_path / "x.conll"), type="tagging", label_column="tag")] * 1, seed=0)
    assert data.labels["n"] == ("B-PER", "O")


@pytest.mark.slow  # a whole run of seven tasks: make test-slow
def test_all_seven_types_train_in_one_run_learn_and_predict(tmp_path, tiny_bert):
    data = write_typed_data(tmp_path)
    out = tmp_path / "run"
    args = ["--config", str(data / "types.yaml"), "--encoder", str(tiny_bert), "--batch-size", "8", "--lr", "2e-3"]
    args += ["--freeze", "none", "--epochs", "4", "--out", str(out), "--compile-cache", "off", "--no-progress"]
    res = cli("train", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    assert {t: test[t]["primary"] for t in test if isinstance(test[t], dict) and "primary" in test[t]} == {
        "nli": "macro_f1", "sts": "spearman", "qa": "ndcg@10", "ner": "entity_f1", "tags": "micro_f1",
        "stars": "spearman", "topic": "macro_f1",
    }  # fmt: skip
    assert test["sts"]["spearman"] >= 0.7 and test["ner"]["entity_f1"] >= 0.9 and test["stars"]["spearman"] >= 0.8
    assert test["tags"]["micro_f1"] >= 0.7 and test["topic"]["macro_f1"] >= 0.7 and test["qa"]["mrr@10"] >= 0.3
    assert test["nli"]["macro_f1"] >= 0.6
    assert len(summary["compiled_shapes"]["train step, phase 0 (none)"]) <= 2  # seven types, two step shapes at most
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["qa"]["primary"] == "ndcg@10" and {"mrr@10", "recall@10", "map@100"} <= set(record["qa"])
    assert test["qa"]["ndcg@10@8"] >= 0.3  # Matryoshka: the first 8 of 32 dimensions rank too
    assert "nDCG@10 at 8" in (out / "report.md").read_text() and (out / "matryoshka_qa.png").stat().st_size > 0
    assert test["sts"]["spearman@8"] >= 0.5 and (out / "matryoshka_sts.png").stat().st_size > 0
    model = load(out / "export")
    emb = model.encode(["who alice goal"], dim=8, normalize=True)
    assert emb.shape == (1, 8) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    one = model.predict(["yesterday Carol smith went to Oslo"])[0]
    assert one["ner"] == ["O", "B-PER", "I-PER", "O", "O", "B-LOC"] and isinstance(one["stars"], float)
    assert set(one) == {"qa", "ner", "tags", "stars", "topic"} and one["qa"].shape == (32,)
    pair = model.predict([("a goal story", "the match news")])[0]
    assert set(pair) == {"nli", "sts"} and pair["nli"].label in ("same", "other") and -1 <= pair["sts"] <= 1
    (tmp_path / "pairs.csv").write_text("a,b\na goal story,the match news\n")
    res = cli(
        "predict", "--model", str(out / "export"), "--input", str(tmp_path / "pairs.csv"), "--text-columns", "a,b"
    )
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["text"] == ["a goal story", "the match news"] and set(row["nli"]["probs"]) == {"same", "other"}
    # retrieval against a corpus: each query's top matches, best first, its own answer among them
    (tmp_path / "corpus.txt").write_text("alice likes the goal 1\nbob likes the vote 2\ncarol likes the chip 3\n")
    res = cli("predict", "--model", str(out / "export"), "--corpus", str(tmp_path / "corpus.txt"), "--top-k", "2",
              "who alice goal", "who carol chip")  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [len(r["qa"]) for r in rows] == [2, 2] and rows[0]["qa"][0]["score"] >= rows[0]["qa"][1]["score"]
    assert rows[0]["qa"][0]["text"] == "alice likes the goal 1" and rows[1]["qa"][0]["text"] == "carol likes the chip 3"


def test_a_retrieval_task_needs_two_pairs_per_step(tmp_path, tiny_bert):
    data = write_typed_data(tmp_path)
    res = cli("train", "--config", str(data / "types.yaml"), "--tasks", "qa", "--encoder", str(tiny_bert),
              "--batch-size", "1", "--out", str(tmp_path / "run"))  # fmt: skip
    assert res.returncode == 2 and "cannot hold two pairs" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


IN_BATCH = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from mtl_jax.config import TaskConfig
from mtl_jax.data.batching import Grid, pack_examples
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.data.text import Segments
from mtl_jax.inference import load_encoder
from mtl_jax.model.multitask import MultiTaskModel, init_params
from mtl_jax.tasks import build
from mtl_jax.training.parallel import make_mesh, replicate, shard_batch
from mtl_jax.training.steps import make_loss_fn

assert jax.device_count() == 4
enc = load_encoder({model!r})
task = build(TaskConfig("qa", "", type="retrieval", text_columns=("q", "p")))
model = MultiTaskModel(enc.config, tasks=(task.head_spec(),), head_dropout=0.0)
params = init_params(model, enc.params, jax.random.PRNGKey(0))
pairs = [(f"question {{i}} about {{w}}", f"the answer on {{w}} is {{i}}") for i, w in enumerate("abcdefghijklmnop")]
ids = enc.tokenizer.encode_examples([Segments(p) for p in pairs], 32).ids
data = Tokenized(ids, {{"qa": np.arange(64, dtype=np.int32).reshape(16, 4)}}, np.zeros(16, np.int32), 0)
batch, _ = pack_examples(data, np.arange(16), Grid(8, 32), enc.tokenizer.pad_id)
loss_fn = make_loss_fn(model, (task,))
f = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0].sum()))
l1, g1 = f(params, batch)
mesh = make_mesh(jax.devices())
l4, g4 = f(replicate(params, mesh), shard_batch(batch, mesh))
quarters = [float(f(params, jax.tree.map(lambda x: x[2 * i : 2 * i + 2], batch))[0]) for i in range(4)]
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)))
rows_used = int((batch.segments.max(axis=1) > 0).sum())
print(json.dumps({{"l1": float(l1), "l4": float(l4), "grad_diff": diff, "quarters": quarters, "rows": rows_used}}))
"""


@pytest.mark.slow
def test_in_batch_negatives_on_four_devices_equal_one_device_holding_the_batch(tiny_bert):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    code = IN_BATCH.format(root=str(ROOT), model=str(tiny_bert))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rows"] == 8  # every device holds pairs
    assert out["l4"] == pytest.approx(out["l1"], abs=1e-5) and out["grad_diff"] <= 1e-5
    # the negatives really come from the other devices: each device's pairs alone score otherwise
    assert abs(np.mean(out["quarters"]) - out["l1"]) > 1e-3


@pytest.mark.slow  # real processes killed: make test-slow
def test_a_pair_retrieval_and_tagging_run_killed_or_interrupted_resumes_to_the_same_run(tmp_path, tiny_bert):
    import signal

    from tests.test_checkpoint import assert_same_run, faulty

    data = write_typed_data(tmp_path)

    def args(out):
        return ["--config", str(data / "types.yaml"), "--tasks", "nli,qa,ner,topic", "--encoder", str(tiny_bert),
                "--batch-size", "8", "--lr", "2e-3", "--compile-cache", "off", "--no-progress", "--out", str(out),
                "--max-steps", "12", "--save-every", "3", "--log-every", "1", "--freeze", "backbone,none@step:4",
                "--keep", "5", "--loss-weighting", "famo"]  # fmt: skip

    r = cli("train", *args(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    killed = faulty(args(tmp_path / "killed"), "kill-after-save", 6)
    assert killed.returncode == -signal.SIGKILL
    stopped = faulty(args(tmp_path / "stopped"), "term-at-batch", 8)
    assert stopped.returncode != 0 and "--resume" in stopped.stderr
    for name in ("killed", "stopped"):
        r = cli("train", *args(tmp_path / name), "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        assert_same_run(tmp_path / "ref", tmp_path / name)


@pytest.mark.slow  # whole runs: make test-slow
def test_configs_glue_trains_every_glue_task_in_one_run_on_a_glue_like_folder(tmp_path, tiny_bert, monkeypatch):
    from tests.helpers import ROOT
    from tests.typed_data import write_glue

    write_glue(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "glue.yaml"), "--encoder", str(tiny_bert), "--batch-size", "16"]
    res = cli("train", *args, "--epochs", "1", "--max-length", "32", "--out", str(out), "--compile-cache", "off")
    assert res.returncode == 0, res.stderr[-3000:]
    test = json.loads((out / "summary.json").read_text())["test"]
    primary = {t: test[t]["primary"] for t in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")}
    assert primary == {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "stsb": "spearman", "qqp": "f1",
                       "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}  # fmt: skip
    assert test["mnli"]["examples"] == 12 and test["cola"]["examples"] == 12 and "pearson" in test["stsb"]
    assert "accuracy" in test["mrpc"] and "accuracy" in test["qqp"]


@pytest.mark.slow  # whole runs: make test-slow
def test_cached_embeddings_train_pair_similarity_and_retrieval_heads_as_the_full_forward(tmp_path, tiny_bert, capsys):
    """A frozen encoder's cached embeddings (each segment of a pair its own) give the same run as the
    full forward pass: the same metrics to float rounding."""
    from mtl_jax.config import TrainConfig, load_config_file
    from mtl_jax.training.trainer import train_and_evaluate

    data = write_typed_data(tmp_path)
    values = load_config_file(data / "types.yaml") | dict(
        encoder=str(tiny_bert), tasks="nli,sts,qa,topic", batch_size=8, progress=False, freeze="backbone",
        epochs=2, head_lr=0.05, compile_cache="off",
    )  # fmt: skip
    cached = train_and_evaluate(TrainConfig(**(values | dict(out=str(tmp_path / "cached")))))
    assert "cached the embeddings of" in capsys.readouterr().err
    full = train_and_evaluate(TrainConfig(**(values | dict(out=str(tmp_path / "full"), cache_embeddings=False))))
    for split in ("validation", "test"):
        for task, key in (("nli", "macro_f1"), ("sts", "spearman"), ("qa", "mrr@10"), ("topic", "macro_f1")):
            assert cached[split][task][key] == pytest.approx(full[split][task][key], abs=1e-4), (split, task)
            assert cached[split][task]["loss"] == pytest.approx(full[split][task]["loss"], rel=1e-4), (split, task)


def _export_scores(run, names):
    """Each task's primary metric recomputed from the run's export on its test split, as a user predicts:
    sentences, pairs as tuples, a tagging sentence as its words joined by spaces."""
    from mtl_jax.config import TaskConfig

    cfg = json.loads((run / "config.json").read_text())
    test = load_tasks([TaskConfig(**t) for t in cfg["task_list"]], seed=cfg["seed"]).splits["test"]
    model = load(run / "export")
    tasks = {t.name: t for t in model.task_objects}
    out = {}
    for name in names:
        task, y = tasks[name], test.labels[name]
        has = np.flatnonzero(has_label(y))
        texts = [test.texts[i] for i in has]
        inputs = [" ".join(t) if isinstance(t, Words) else tuple(t) if isinstance(t, tuple) else t for t in texts]
        probs = model.predict_proba(inputs)[name]
        if task.token_level:  # per sentence its words' tag ids (an object array, as the labels)
            preds = np.empty(len(probs), object)
            for i, p in enumerate(probs):
                preds[i] = np.argmax(p, -1)
        else:
            preds = probs[:, 0] if task.outputs == 1 else np.argmax(probs, -1)
        out[name] = task.metrics(y[has], preds)[task.primary]
    return out


def test_lora_trains_pair_similarity_retrieval_and_tagging_and_the_merged_export_gives_its_scores(tmp_path, tiny_bert):
    """LoRA with every head kind beyond a sentence's Dense: (u, v, |u-v|), a cosine, in-batch negatives,
    per-token. The adapters merged into the export give the run's own test scores."""
    data = write_typed_data(tmp_path)
    out = tmp_path / "run"
    args = ["--config", str(data / "types.yaml"), "--tasks", "nli,sts,qa,ner", "--encoder", str(tiny_bert)]
    args += ["--batch-size", "8", "--lr", "2e-2", "--freeze", "lora", "--lora-rank", "4", "--lora-lr", "1e-3"]
    res = cli("train", *args, "--epochs", "2", "--out", str(out), "--compile-cache", "off", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters"]["lora"] > 0
    test = summary["test"]
    assert test["ner"]["entity_f1"] >= 0.5 and test["sts"]["spearman"] >= 0.5 and test["qa"]["mrr@10"] >= 0.3
    got = _export_scores(out, ("nli", "sts", "ner"))
    assert got == {t: pytest.approx(test[t][test[t]["primary"]], abs=1e-6) for t in got}


@pytest.mark.slow  # three real runs on 4 forced devices: make test-slow
def test_pair_similarity_retrieval_and_tagging_on_four_devices_with_fsdp_match_one_and_run_in_bf16(tmp_path, tiny_bert):
    """The same run on 1 device and on 4 with FSDP: every logged loss and metric agree (the pairs, the
    in-batch negatives and the token labels split over devices by rows); bf16 compute on 4 devices
    trains to the same losses within bf16's precision."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    data = write_typed_data(tmp_path)

    def run(name, devices, *extra):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        args = ["--config", str(data / "types.yaml"), "--tasks", "nli,sts,qa,ner,topic", "--encoder", str(tiny_bert),
                "--batch-size", "16", "--lr", "2e-3", "--freeze", "none", "--max-steps", "8", "--log-every", "1",
                "--eval-every", "4", "--compile-cache", "off", "--no-progress", "--out", str(tmp_path / name), *extra]  # fmt: skip
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                           text=True, env=env, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"({devices} device(s)" in r.stderr
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    one, fsdp = run("one", 1), run("fsdp", 4, "--fsdp")
    bf16 = run("bf16", 4, "--fsdp", "--dtype", "bfloat16")
    assert [r["step"] for r in one] == [r["step"] for r in fsdp] == [r["step"] for r in bf16]
    for a, b, c in zip(one, fsdp, bf16):
        for task in ("nli", "sts", "qa", "ner", "topic"):
            if task in a and a[task]["loss"] is not None:  # (a train record has the tasks of its step)
                assert b[task]["loss"] == pytest.approx(a[task]["loss"], rel=1e-5, abs=1e-5), (a["step"], task)
                assert c[task]["loss"] == pytest.approx(a[task]["loss"], rel=0.02), (a["step"], task)
        if a["split"] == "validation":
            for task, key in (("nli", "macro_f1"), ("sts", "spearman"), ("qa", "mrr@10"), ("ner", "entity_f1")):
                assert b[task][key] == pytest.approx(a[task][key], abs=1e-6), (a["step"], task)


@pytest.mark.slow  # ten short runs: make test-slow
def test_every_loss_weighting_trains_pair_retrieval_tagging_and_regression_tasks(tmp_path, tiny_bert):
    """Each weighting method (those that put every task in each step stack a retrieval task's pairs and
    a tagging task's token labels per task), two with gradient accumulation: finite losses for every
    task and every task scored on test."""
    from mtl_jax.training.weighting import REGISTRY as METHODS

    data = write_typed_data(tmp_path)
    for method in METHODS:
        accum = ["--grad-accum", "2"] if method in ("famo", "pcgrad") else []
        args = ["--config", str(data / "types.yaml"), "--tasks", "nli,qa,ner,stars", "--encoder", str(tiny_bert),
                "--batch-size", "16", "--freeze", "none", "--max-steps", "3", "--log-every", "1", "--loss-weighting",
                method, *accum, "--out", str(tmp_path / method), "--compile-cache", "off", "--no-progress"]  # fmt: skip
        res = cli("train", *args)
        assert res.returncode == 0, (method, res.stderr[-3000:])
        records = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        losses = [r[t]["loss"] for r in records for t in ("nli", "qa", "ner", "stars") if r.get(t, {}).get("loss")]
        assert losses and all(math.isfinite(v) for v in losses), method
        test = json.loads((tmp_path / method / "summary.json").read_text())["test"]
        scores = {t: test[t][test[t]["primary"]] for t in ("nli", "qa", "ner", "stars")}
        assert all(math.isfinite(v) for v in scores.values()), (method, scores)


def test_derived_examples_load_as_configs_types_embedded_names_them(tmp_path, monkeypatch):
    """scripts/derive_examples.py writes every file the seven-type example config reads, and they load
    without a bad row: the README's real-data command starts from here."""
    import runpy
    import sys

    from mtl_jax.config import load_config_file
    from tests.helpers import ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["derive_examples.py"])
    runpy.run_path(str(ROOT / "scripts" / "derive_examples.py"), run_name="__main__")
    values = load_config_file(ROOT / "configs" / "types-embedded.yaml")
    data = load_tasks(values["task_list"])
    types = {t.name: t.config.type for t in data.tasks}
    assert sorted(set(types.values())) == sorted(
        ["classification", "pair_classification", "retrieval", "similarity", "multilabel", "tagging", "regression"]
    )
    train = data.splits["train"]
    counts = {name: int(np.sum(has_label(train.labels[name]))) for name in types}
    assert min(counts.values()) >= 1500, counts
    tags = data.labels["moral_terms"]
    assert "O" in tags and "B-care.virtue" in tags and "I-authority.virtue" in tags


@pytest.mark.parametrize("normalize", [True, False])
def test_the_bi_pair_head_reads_unit_embeddings_where_the_checkpoint_normalises_them(minilm, normalize):
    """As sentence-transformers' SoftmaxLoss: Dense over (u, v, |u - v|) of the model's output, which
    for all-MiniLM-L6-v2 ends in Normalize; ``normalize: false`` reads the pooled embeddings."""
    import jax

    from mtl_jax.data.batching import Grid, pack_examples
    from mtl_jax.data.text import Segments
    from mtl_jax.data.tokenized import Tokenized
    from mtl_jax.model.multitask import MultiTaskModel

    assert minilm.spec.normalize
    task = build(
        TaskConfig(
            "nli", "x.csv", type="pair_classification", text_columns=("a", "b"), labels=("n", "y"), normalize=normalize
        )
    )
    pairs = [("A man is playing a guitar.", "Someone plays music."), ("Cats sleep.", "The market fell today.")]
    enc = minilm.tokenizer.encode_examples([Segments(p) for p in pairs], 64)
    data = Tokenized(enc.ids, {"nli": np.ones(len(pairs), np.int32)}, np.zeros(len(pairs), np.int32), 0)
    batch, call = pack_examples(data, np.arange(len(pairs)), Grid(2, 64), minilm.tokenizer.pad_id)
    model = MultiTaskModel(minilm.config, tasks=(task.head_spec(),), head_dropout=0.0, normalize=True)
    rng = np.random.default_rng(0)
    head = {"kernel": jnp.asarray(rng.normal(size=(3 * 384, 2)), jnp.float32), "bias": jnp.zeros(2, jnp.float32)}
    variables = {"params": {"encoder": minilm.params, "heads": {"nli": head}}}
    out = model.apply(variables, batch.ids, batch.positions, batch.segments, 16, method="classify_packed")["nli"]
    emb = minilm.encode([s for p in pairs for s in p], normalize=normalize).reshape(len(pairs), 2, -1)
    u, v = emb[:, 0], emb[:, 1]
    want = np.concatenate([u, v, np.abs(u - v)], axis=1) @ np.asarray(head["kernel"])
    first = call.first & (call.index >= 0)
    got = np.asarray(jax.device_get(out)).reshape(-1, 2)[first]
    np.testing.assert_allclose(got, want[call.index[first]], atol=1e-4)

    def loss(encoder):  # the rows' empty slots (zero embeddings) must not make the encoder's gradient NaN
        v = {"params": {"encoder": encoder, "heads": {"nli": head}}}
        y = model.apply(v, batch.ids, batch.positions, batch.segments, 16, method="classify_packed")["nli"]
        return jnp.sum(jnp.where(jnp.asarray(first.reshape(y.shape[:2]))[..., None], y, 0.0))

    grads = jax.grad(loss)(minilm.params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
