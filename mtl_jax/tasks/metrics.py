"""Metrics from labels and predictions on the host: classification (accuracy, macro-F1, the positive
class's F1, Matthews correlation), correlations (scipy's Pearson and Spearman), ranking (MRR@10,
recall@k), multi-label F1 and seqeval-style entity F1 over BIO / IOBES tags."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix.

    ``confusion[i][j]`` counts examples of true class i predicted as j. A class that is
    never predicted (or never present) gets precision (recall) 0, as scikit-learn does.
    """
    return confusion_report(confusion_matrix(y_true, y_pred, len(labels)), labels)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """``[k, k]`` int64: ``[i, j]`` counts examples of true class i predicted as j."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def confusion_report(confusion: np.ndarray, labels: Sequence[str]) -> dict:
    """:func:`classification_report` from the confusion matrix alone (a split's counts, summed batch by batch)."""
    k = len(labels)
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(confusion.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()),
        "f1": float(f1[-1]),  # the positive class's (the last label's: "1", "positive", "yes" sort last)
        "mcc": matthews(confusion),
        "precision": {name: float(p) for name, p in zip(labels, precision)},
        "recall": {name: float(r) for name, r in zip(labels, recall)},
        "class_f1": {name: float(f) for name, f in zip(labels, f1)},
        "support": {name: int(a) for name, a in zip(labels, actual)},
        "confusion": confusion.tolist(),
        "examples": n,
    }


def matthews(confusion: np.ndarray) -> float:
    """Matthews correlation of a ``[K, K]`` confusion matrix (Gorodkin's K-class form; 0 when undefined)."""
    c = np.asarray(confusion, np.float64)
    n, correct = c.sum(), np.trace(c)
    predicted, actual = c.sum(axis=0), c.sum(axis=1)
    cov = correct * n - actual @ predicted
    denom = np.sqrt((n * n - predicted @ predicted) * (n * n - actual @ actual))
    return float(cov / denom) if denom > 0 else 0.0


def correlations(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """scipy's Pearson and Spearman correlation (0 where undefined: fewer than two examples, a constant)."""
    from scipy import stats

    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    n = len(y_true)
    defined = n >= 2 and np.ptp(y_true) > 0 and np.ptp(y_pred) > 0
    pearson = float(stats.pearsonr(y_true, y_pred)[0]) if defined else 0.0
    spearman = float(stats.spearmanr(y_true, y_pred)[0]) if defined else 0.0
    return {"pearson": pearson, "spearman": spearman, "examples": n}


RANK_CHUNK_NUMBERS = 1 << 24  # similarities held at once while ranking (64 MiB of float32)
RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "map@100")


def retrieval_metrics(
    queries: np.ndarray, positives: np.ndarray, query_keys, positive_keys, others=None, other_keys=()
) -> dict:
    """sentence-transformers' InformationRetrievalEvaluator's figures (cosine) for (query, positive) rows.

    Queries and passages are grouped by text (``*_keys``: one hashable key per row's text): each
    distinct query is ranked against the distinct passages, and every passage some row pairs with it
    is relevant, so a passage written twice is one document and a query with several positives has
    them all. ``others`` (``[M, D]``, keyed by ``other_keys``: the rows' hard negatives) join the
    corpus as documents relevant to no query, unless a row pairs the same text with its query.
    ``ndcg@10`` (primary), ``mrr@10``, ``recall@1``, ``recall@10``, ``map@100``, as that
    evaluator computes them; ties go to the passage seen first (positives before the others). Queries
    are ranked a chunk at a time (memory: chunk x passages), never all at once.
    """
    q_keys, p_keys, o_keys = list(map(_key, query_keys)), list(map(_key, positive_keys)), list(map(_key, other_keys))
    q_first = list(dict.fromkeys(q_keys))
    doc_of = {k: j for j, k in enumerate(dict.fromkeys(p_keys + o_keys))}
    relevant: dict = {k: set() for k in q_first}
    for q, p in zip(q_keys, p_keys):
        relevant[q].add(doc_of[p])
    q_rows = {k: i for i, k in reversed(list(enumerate(q_keys)))}  # each query's first row
    d_rows = {k: i for i, k in reversed(list(enumerate(p_keys + o_keys)))}
    passages = np.concatenate([np.asarray(positives), np.asarray(others)]) if o_keys else np.asarray(positives)
    docs = unit_rows(passages[[d_rows[k] for k in doc_of]])
    qs = unit_rows(np.asarray(queries)[[q_rows[k] for k in q_first]])
    sums = dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    for start, top, _ in top_k(qs, docs, 100):
        for row, key in zip(top, q_first[start : start + len(top)]):
            for name, value in _ranked(row, relevant[key]).items():
                sums[name] += value
    n = len(qs)
    return {name: s / n if n else 0.0 for name, s in sums.items()} | {"examples": n}


def top_k(queries: np.ndarray, docs: np.ndarray, k: int):
    """``(first query, indices [chunk, k], scores [chunk, k])`` per chunk of queries: each query's ``k``
    best documents by the product of unit vectors, best first (a tie: the document seen first),
    computed on the device (``jax.lax.top_k``: no full sort). Memory is the documents and a chunk's
    similarities (:data:`RANK_CHUNK_NUMBERS`), never queries x documents."""
    k = min(k, len(docs))
    chunk = max(1, min(len(queries), RANK_CHUNK_NUMBERS // max(len(docs), 1)))
    on_device = jnp.asarray(docs, jnp.float32)
    for start in range(0, len(queries), chunk):
        part = np.asarray(queries[start : start + chunk], np.float32)
        n = len(part)
        if n < chunk:  # the last chunk: padded to the others' shape (one compiled program)
            part = np.concatenate([part, np.zeros((chunk - n,) + part.shape[1:], np.float32)])
        scores, top = _best(jnp.asarray(part), on_device, k)
        yield start, np.asarray(top)[:n], np.asarray(scores)[:n]


@functools.partial(jax.jit, static_argnames="k")
def _best(queries: jax.Array, docs: jax.Array, k: int):
    sims = jnp.matmul(queries, docs.T, precision=jax.lax.Precision.HIGHEST)  # (no TF32 on GPUs)
    return jax.lax.top_k(sims, k)


def _ranked(top: np.ndarray, relevant: set) -> dict:
    """One query's figures from its ranked passages ``top`` (best first) and its relevant ones."""
    hit = np.array([d in relevant for d in top], np.float64)
    discount = 1.0 / np.log2(np.arange(2, len(hit) + 2))
    ideal = discount[: min(len(relevant), 10)].sum()
    first = np.flatnonzero(hit[:10])
    precisions = np.cumsum(hit[:100]) / np.arange(1, len(hit[:100]) + 1)
    return {
        "ndcg@10": float((hit[:10] * discount[:10]).sum() / ideal),
        "mrr@10": 1.0 / (first[0] + 1) if len(first) else 0.0,
        "recall@1": hit[:1].sum() / len(relevant),
        "recall@10": hit[:10].sum() / len(relevant),
        "map@100": float((precisions * hit[:100]).sum() / min(100, len(relevant))),
    }


def _key(value):
    return value.tobytes() if isinstance(value, np.ndarray) else value


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows at unit length (float32), as the evaluator's cosine takes them (an all-zero row stays zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _f1(tp, fp, fn):
    """Precision, recall and F1 from counts (arrays or numbers; 0 where undefined)."""
    tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Micro- and macro-F1 and per-label precision / recall / F1 of 0/1 matrices ``[N, K]``."""
    t, p = y_true > 0, y_pred > 0
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    prec, rec, f1 = _f1(tp, fp, fn)
    micro = _f1(tp.sum(), fp.sum(), fn.sum())[2]
    return {
        "micro_f1": float(micro),
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "precision": {n: float(x) for n, x in zip(labels, prec)},
        "recall": {n: float(x) for n, x in zip(labels, rec)},
        "class_f1": {n: float(x) for n, x in zip(labels, f1)},
        "support": {n: int(x) for n, x in zip(labels, t.sum(0))},
        "examples": int(len(t)),
    }


def entities(sentences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` of every entity in tagged sentences, read exactly as seqeval's default
    (conlleval) mode reads them, whatever the scheme (BIO, IOB1, IOBES, BILOU, unprefixed tags):
    the sentences one sequence with an ``O`` after each, a tag's first character its prefix and the
    rest after the first ``-`` its type."""
    found: set[tuple[str, int, int]] = set()
    prev_tag, prev_type, begin = "O", "", 0
    flat = [tag for sentence in sentences for tag in [*sentence, "O"]]
    for i, chunk in enumerate([*flat, "O"]):
        tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            found.add((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return found


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", ".") and prev_type != type_)
    )


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
        or (tag not in ("O", ".") and prev_type != type_)
    )


def entity_scores(true: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity precision, recall and F1 over sentences (an entity counts when type and span match), as
    seqeval's default mode computes them."""
    et, ep = entities(true), entities(pred)
    prec, rec, f1 = _f1(len(et & ep), len(ep - et), len(et - ep))
    return {"entity_precision": float(prec), "entity_recall": float(rec), "entity_f1": float(f1)}
