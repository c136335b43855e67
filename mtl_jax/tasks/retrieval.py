"""``retrieval``: (query, positive) pairs trained with in-batch negatives.

Each query is scored against every positive of the step (and every hard negative, with
``negative_column``) by the cosine scaled by 20, and trained with cross-entropy towards its own
positive: sentence-transformers' MultipleNegativesRankingLoss. The step's arrays are global over
the devices, so the negatives come from every device of the step; with ``--grad-accum`` K, from
the micro-batch. Needs two pairs in a step at least.

Evaluation computes what sentence-transformers' InformationRetrievalEvaluator computes: a split's
queries and positives grouped by text (a passage written twice is one document; a query with several
positives has them all), each distinct query ranked against the split's distinct passages: nDCG@10
(primary), MRR@10, recall@1, recall@10 and MAP@100. An example's label is its two texts' keys, which
is what lets evaluation group them. Prediction gives embeddings (``predict.py --corpus`` ranks a corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.errors import MtlError
from mtl_jax.model.heads import Features, HeadSpec, l2_normalize, next_slot
from mtl_jax.options import option
from mtl_jax.tasks.base import LossSums, Task, register
from mtl_jax.tasks.metrics import RETRIEVAL_METRICS, retrieval_metrics
from mtl_jax.tasks.pair import PairOptions, PairText

SCALE = 20.0  # the cosine's scale (MultipleNegativesRankingLoss's default)


def in_batch_loss(out: jnp.ndarray, valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per query (``out`` ``[N, k, D]``: query, positive and k - 2 negatives, unit length; ``valid`` [N]):
    the cross-entropy of its own positive among every valid example's positive and negatives, and
    whether its own scores highest."""
    n = out.shape[0]
    candidates = jnp.moveaxis(out[:, 1:], 1, 0).reshape(-1, out.shape[-1])  # [(k - 1) N, D]: positives, then negatives
    scores = SCALE * out[:, 0] @ candidates.T  # [N, (k - 1) N]
    scores = jnp.where(
        jnp.tile(valid, out.shape[1] - 1)[None, :], scores, -1e9
    )  # (finite: a row with no pair stays finite)
    own = scores[jnp.arange(n), jnp.arange(n)]
    nll = jax.nn.logsumexp(scores, axis=-1) - own
    return jnp.where(valid, nll, 0.0), valid & (jnp.argmax(scores, axis=-1) == jnp.arange(n))


def text_key(text: str) -> tuple[int, int]:
    """A text's identity as two non-negative 31-bit numbers (a stable hash: the same in every run)."""
    digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return (digest >> 33) & 0x7FFFFFFF, (digest >> 2) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class RetrievalOptions(PairOptions):
    negative_column: Optional[str] = option(None, "a column holding a hard negative per row")


@register("retrieval")
@dataclasses.dataclass(frozen=True)
class Retrieval(PairText, Task):
    primary = "ndcg@10"
    record_keys = ("loss",) + RETRIEVAL_METRICS + ("examples",)
    label_shape = (4,)  # the keys of its query's and its positive's texts, two 31-bit halves each
    Options = RetrievalOptions
    ranks_corpus = True
    distinct_in_batch = True  # a repeated query or passage would be scored as its own negative

    def __post_init__(self):
        self.check_pair()  # (the hard negative column is its own key)
        if self.options.encoding != "bi":
            raise MtlError(f"task {self.name}: retrieval encodes queries and passages apart (encoding: bi)")

    def text_columns(self) -> tuple[str, ...]:
        negative = self.options.negative_column
        return tuple(self.options.text_columns or ()) + ((negative,) if negative else ())

    roles = ("query", "positive")

    def columns(self) -> tuple[str, ...]:
        return ()

    @property
    def input_kind(self) -> str:
        return "sentence"  # predict takes a query (or a passage): its embedding

    def raw_label(self, fields: dict):
        """The row's query and positive texts: every row is a pair, its label the texts' identity."""
        query, positive = self.options.text_columns
        return (fields.get(query), fields.get(positive))

    def label_id(self, raw) -> np.ndarray:
        return np.array([half for text in raw for half in text_key(text)], np.int32)

    def check_batch(self, examples_per_step: int) -> None:
        if examples_per_step < 2:
            raise MtlError(
                f"task {self.name} (retrieval): a step of {examples_per_step} example(s) cannot hold two pairs "
                "(in-batch negatives); raise --batch-size"
            )

    @property
    def outputs(self) -> int:
        return 0

    def head_options(self) -> tuple:
        return (("width", len(self.text_columns())),)

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        """``[R, S, k, D]`` at each example's first slot: its k segments' unit-length embeddings (no parameters)."""
        u = l2_normalize(features.pooled)
        return jnp.stack([u] + [next_slot(u, j) for j in range(1, spec.option("width"))], axis=2)

    def loss_sums(self, outputs, y):
        out = outputs.reshape((-1,) + outputs.shape[2:]).astype(jnp.float32)
        valid = self.present(y).reshape(-1)
        nll, correct = in_batch_loss(out, valid)
        return LossSums(jnp.sum(nll), jnp.sum(correct), jnp.sum(valid))

    def predict(self, outputs):
        return outputs[:, :, :2]  # (query, positive)

    def values(self, outputs):
        return outputs[:, :, 0]  # the query's embedding (unit length)

    def metrics(self, y_true, y_pred) -> dict:
        y_true = np.asarray(y_true)
        return retrieval_metrics(np.asarray(y_pred[:, 0]), np.asarray(y_pred[:, 1]), y_true[:, :2], y_true[:, 2:])

    def describe(self, result: dict) -> str:
        return f"nDCG@10 {result['ndcg@10']:.3f} MRR@10 {result['mrr@10']:.3f} R@1 {result['recall@1']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        columns = (("nDCG@10", "ndcg@10"), ("MRR@10", "mrr@10"), ("recall@1", "recall@1"), ("recall@10", "recall@10"))
        return self.split_table(summary, columns + (("MAP@100", "map@100"),), count="queries")

    def output_cell(self, output) -> str:
        """The query's embedding, or (``predict --corpus``) its best match and score."""
        if isinstance(output, list):
            return f"{output[0]['text'][:16]} ({output[0]['score']:.2f})" if output else "-"
        return f"[{len(output)} numbers]"

    def output(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)
