"""Hard negatives mined with a sentence encoder, for (query, positive) pairs.

Each distinct query is ranked against a corpus (by default the pairs' distinct positives) on the
device, a chunk of queries at a time (:func:`mtl_jax.tasks.metrics.top_k`: never queries x corpus).
A candidate is left out when it is one of the query's positives (any row's) or the query's own
text; of the rest, ranks ``range_min`` to ``range_max`` are considered, best first, and a candidate
is taken for a row when its score passes the filters against false negatives, compared with that
row's positive score: at most ``max_ratio`` times it (NV-Retriever's TopK-PercPos; 0.95 by default)
and, with ``margin``, at most it minus ``margin``. Up to ``negatives`` per row; a row that finds fewer
keeps fewer (the retrieval type masks the missing ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from mtl_jax.errors import MtlError
from mtl_jax.tasks.metrics import top_k


@dataclass(frozen=True)
class MineSettings:
    negatives: int = 3  # per row at most
    range_min: int = 0  # the first rank considered (0: the best candidate that is no positive)
    range_max: int = 100  # ranks below this are considered
    max_ratio: float | None = 0.95  # a negative's score at most this times the positive's (TopK-PercPos)
    margin: float | None = None  # a negative's score at most the positive's minus this

    def check(self) -> None:
        if self.negatives < 1:
            raise MtlError(f"--negatives must be at least 1, got {self.negatives}")
        if not 0 <= self.range_min < self.range_max:
            raise MtlError(
                f"the rank range must have 0 <= --range-min < --range-max, got {self.range_min}, {self.range_max}"
            )

    def passes(self, scores: np.ndarray, positive: float) -> np.ndarray:
        """Which candidate ``scores`` may be negatives of a row whose positive scores ``positive``."""
        keep = np.ones(len(scores), bool)
        if self.max_ratio is not None:
            keep &= scores <= self.max_ratio * positive
        if self.margin is not None:
            keep &= scores <= positive - self.margin
        return keep


@dataclass
class Mined:
    """Per row, its negatives (corpus indices, best first) and their scores; each row's positive score."""

    negatives: list[np.ndarray]
    scores: list[np.ndarray]
    positive_scores: np.ndarray

    def summary(self, wanted: int) -> str:
        counts = np.array([len(n) for n in self.negatives])
        got = counts > 0
        gap = (
            f"; their negatives score {np.concatenate(self.scores).mean():.3f} on average, their positives "
            f"{self.positive_scores[got].mean():.3f}"
            if got.any()
            else ""
        )
        return (
            f"{len(counts)} rows: {int((counts >= wanted).sum())} with {wanted} negatives, "
            f"{int((got & (counts < wanted)).sum())} with fewer, {int((~got).sum())} with none{gap}"
        )


def mine(
    query_emb: np.ndarray,
    positive_emb: np.ndarray,
    corpus_emb: np.ndarray,
    query_of_row: np.ndarray,
    excluded: Sequence[set],
    settings: MineSettings,
    progress: bool | None = None,
) -> Mined:
    """Hard negatives per row from unit-length embeddings: ``query_emb`` ``[Q, D]`` (distinct queries),
    ``positive_emb`` ``[N, D]`` (each row's positive), ``corpus_emb`` ``[C, D]``; ``query_of_row`` [N]
    the row's query; ``excluded[q]`` the corpus indices query ``q`` never takes (its positives, itself)."""
    settings.check()
    positive_scores = np.einsum("nd,nd->n", query_emb[query_of_row], positive_emb)
    rows_of: list[list[int]] = [[] for _ in range(len(query_emb))]
    for r, q in enumerate(query_of_row):
        rows_of[q].append(r)
    pool = settings.range_max + max((len(e) for e in excluded), default=0)
    negatives: list = [np.zeros(0, np.int64)] * len(query_of_row)
    scores: list = [np.zeros(0, np.float32)] * len(query_of_row)
    if progress is None:
        progress = len(query_emb) >= 10_000
    with tqdm(total=len(query_emb), unit="query", desc="mine", disable=not progress) as bar:
        for start, top, sims in top_k(query_emb, corpus_emb, pool):
            for q in range(start, start + len(top)):
                keep = np.fromiter((d not in excluded[q] for d in top[q - start]), bool, top.shape[1])
                cand = top[q - start][keep][settings.range_min : settings.range_max]
                cand_scores = sims[q - start][keep][settings.range_min : settings.range_max]
                for r in rows_of[q]:
                    ok = np.flatnonzero(settings.passes(cand_scores, positive_scores[r]))[: settings.negatives]
                    negatives[r], scores[r] = cand[ok], cand_scores[ok]
            bar.update(len(top))
    return Mined(negatives, scores, positive_scores)
