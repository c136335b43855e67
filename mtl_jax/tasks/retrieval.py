"""``retrieval``: (query, positive) pairs trained with in-batch negatives, and hard negatives.

Each query is scored against every positive and every hard negative of the step by the cosine
scaled by 20, and trained with cross-entropy towards its own positive: sentence-transformers'
MultipleNegativesRankingLoss. Hard negatives are the columns after the positive in
``text_columns`` (``[query, positive, neg_1, ..., neg_k]``) and/or ``negatives_column``, a column
holding a list of them (a JSON or Arrow list; a plain text is one). A row may have fewer negatives
than others (an empty cell, a shorter list): the missing ones are left out of the scores (masked),
not filled with copies. The step's arrays are global over the devices, so the negatives come from
every device of the step; with ``--grad-accum`` K, from the micro-batch. Needs two pairs in a step
at least. ``mtl-mine`` (:mod:`mtl_jax.commands.mine`) writes hard negatives mined with a model.

Evaluation computes what sentence-transformers' InformationRetrievalEvaluator computes: a split's
queries and positives grouped by text (a passage written twice is one document; a query with several
positives has them all), each distinct query ranked against the split's distinct passages: nDCG@10
(primary), MRR@10, recall@1, recall@10 and MAP@100; a validation or test row's hard negatives join
that corpus as passages relevant to no query (as a BEIR-style corpus holds them). An example's label
is its query's, positive's and negatives' text keys, which is what lets evaluation group them, and
how many texts it has. Prediction gives embeddings (``predict.py --corpus`` ranks a corpus).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.packing import MAX_SEGMENTS
from mtl_jax.data.text import Segments
from mtl_jax.errors import MtlError
from mtl_jax.model.heads import Features, HeadSpec, l2_normalize, next_slot
from mtl_jax.options import names, option
from mtl_jax.tasks.base import BadText, LossSums, Task, check_text, register
from mtl_jax.tasks.matryoshka import Matryoshka, MatryoshkaOptions
from mtl_jax.tasks.metrics import RETRIEVAL_METRICS, retrieval_metrics
from mtl_jax.tasks.pair import PairOptions, PairText

SCALE = 20.0  # the cosine's scale (MultipleNegativesRankingLoss's default)


def query_cosines(out: jnp.ndarray) -> jnp.ndarray:
    """``[N, (k - 1) N]``: each query's cosine to every example's positive, then to every negative
    (``out`` ``[N, k, D]`` unit length)."""
    candidates = jnp.moveaxis(out[:, 1:], 1, 0).reshape(-1, out.shape[-1])  # [(k - 1) N, D]: positives, then negatives
    return out[:, 0] @ candidates.T


def in_batch_loss(
    out: jnp.ndarray, texts: jnp.ndarray, guide_margin: float | None = None, guide_out: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per query (``out`` ``[N, k, D]``: query, positive and k - 2 negatives, unit length; ``texts`` [N]:
    how many of the k an example has, 0 for none): the cross-entropy of its own positive among every
    example's positive and negatives, and whether its own scores highest. With ``guide_margin``
    (GISTEmbed's guided loss), a candidate whose guide cosine to the query is above the query's own
    positive's minus the margin is left out of its negatives (a likely positive); the guide is
    ``guide_out`` (the starting encoder's ``[N, k, D]``), else the model itself."""
    n, k = out.shape[:2]
    valid = texts >= 2
    present = (jnp.arange(1, k)[:, None] < texts[None, :]).reshape(-1)  # [(k - 1) N], in the candidates' order
    cosines = query_cosines(out)  # [N, (k - 1) N]
    keep = jnp.broadcast_to(present[None, :], cosines.shape)
    if guide_margin is not None:
        guide = jax.lax.stop_gradient(cosines if guide_out is None else query_cosines(guide_out))
        own_cosine = guide[jnp.arange(n), jnp.arange(n)]
        own = jnp.arange(cosines.shape[1])[None, :] == jnp.arange(n)[:, None]
        keep &= own | (guide <= own_cosine[:, None] - guide_margin)
    scores = jnp.where(keep, SCALE * cosines, -1e9)  # (finite: a row with no pair stays finite)
    own = scores[jnp.arange(n), jnp.arange(n)]
    nll = jax.nn.logsumexp(scores, axis=-1) - own
    return jnp.where(valid, nll, 0.0), valid & (jnp.argmax(scores, axis=-1) == jnp.arange(n))


def text_key(text: str) -> tuple[int, int]:
    """A text's identity as two non-negative 31-bit numbers (a stable hash: the same in every run)."""
    digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")
    return (digest >> 33) & 0x7FFFFFFF, (digest >> 2) & 0x7FFFFFFF


MOST_NEGATIVES = MAX_SEGMENTS - 2  # an example's texts share one packed row


@dataclasses.dataclass(frozen=True)
class RetrievalOptions(PairOptions, MatryoshkaOptions):
    text_columns: Optional[tuple[str, ...]] = option(
        None, "query, positive, then any hard negative columns", parse=names
    )
    negatives_column: Optional[str] = option(None, "a column holding a list of hard negatives per row")
    guide: Optional[str] = option(
        None,
        "self | initial: a candidate that the model (self) or the starting encoder, kept frozen beside it "
        "(initial), scores above the query's positive (minus guide_margin) is no negative",
    )
    guide_margin: float = option(0.0, "with guide: how far below the positive's cosine a negative must score")


@register("retrieval")
@dataclasses.dataclass(frozen=True)
class Retrieval(Matryoshka, PairText, Task):
    primary = "ndcg@10"
    Options = RetrievalOptions
    ranks_corpus = True
    distinct_in_batch = True  # a repeated query or passage would be scored as its own negative

    roles = ("query", "positive")
    sized = ("nDCG@10", "ndcg@10")

    def __post_init__(self):
        cols = self.options.text_columns or ()
        if not 2 <= len(cols) <= MAX_SEGMENTS:
            raise MtlError(
                f"task {self.name} (retrieval): text_columns must name the query, the positive and up to "
                f"{MOST_NEGATIVES} hard negative columns, got {self.options.text_columns}"
            )
        if self.options.encoding != "bi":
            raise MtlError(f"task {self.name}: retrieval encodes queries and passages apart (encoding: bi)")
        if self.options.guide not in (None, "self", "initial"):
            raise MtlError(f"task {self.name}: unknown guide {self.options.guide!r} (self, initial)")
        self.check_weights()

    @property
    def label_shape(self) -> tuple[int, ...]:
        """The keys of its query's and its positive's texts (two 31-bit halves each), how many texts it
        has, then its hard negatives' keys (-1 where it has fewer)."""
        return (5 + 2 * (self.width - 2),)

    @property
    def record_keys(self) -> tuple[str, ...]:
        return ("loss",) + RETRIEVAL_METRICS + self.sized_keys() + ("examples",)

    def text_columns(self) -> tuple[str, ...]:
        return tuple(self.options.text_columns[:2])

    def optional_columns(self) -> tuple[str, ...]:
        """The hard negatives' columns: a file without them (validation, test) has none."""
        listed = self.options.negatives_column
        return tuple(self.options.text_columns[2:]) + ((listed,) if listed else ())

    def negatives(self, fields: dict) -> list[tuple[str, str]]:
        """A row's hard negatives with the column each came from: its negative columns', then its
        list's, empty ones left out."""
        values = [(c, fields.get(c)) for c in self.options.text_columns[2:]]
        listed = fields.get(self.options.negatives_column) if self.options.negatives_column else None
        many = listed if isinstance(listed, tuple) else [listed]
        values += [(self.options.negatives_column, v) for v in many]
        return [(c, v) for c, v in values if v is not None and str(v).strip()]

    def text(self, fields: dict):
        """The query, the positive and the hard negatives, each its own segment (behind its column's prompt)."""
        query, positive = self.options.text_columns[:2]
        texts = [(query, fields.get(query)), (positive, fields.get(positive))] + self.negatives(fields)
        texts = [self.prompted(check_text(v, c if i < 2 else "negatives"), c) for i, (c, v) in enumerate(texts)]
        bad = [t for t in texts if isinstance(t, BadText)]
        if bad:
            return bad[0]
        if len(texts) > MAX_SEGMENTS:
            return BadText(f"{len(texts) - 2} hard negatives (at most {MOST_NEGATIVES})")
        return Segments(texts)

    def input_text(self, value):
        """``predict``'s input is a query."""
        return self.prompted(value, self.options.text_columns[0])

    def corpus_text(self, value):
        """``predict --corpus``'s texts are passages."""
        return self.prompted(value, self.options.text_columns[1])

    @property
    def width(self) -> int:
        """The most texts an example has: the training data's, or the configured columns' if more (a
        validation or test file's negative columns are ranked when the training file has none)."""
        return int(self.stats[0]) if self.stats else len(self.options.text_columns)

    def with_labels(self, raw_train_labels) -> Retrieval:
        if self.stats:
            return self
        widest = max([raw[4] for raw in raw_train_labels] + [len(self.options.text_columns)])
        return dataclasses.replace(self, stats=(float(min(widest, MAX_SEGMENTS)),))

    def columns(self) -> tuple[str, ...]:
        return ()

    @property
    def input_kind(self) -> str:
        return "sentence"  # predict takes a query (or a passage): its embedding

    def raw_label(self, fields: dict):
        """The keys of the row's query and positive texts (their identity is its label), how many
        texts it has, then its negatives' keys (None without a query or positive: the row's text says
        why). Evaluation ranks each split's negatives with its passages."""
        texts = [fields.get(c) for c in self.options.text_columns[:2]]
        if not all(isinstance(t, str) for t in texts):
            return None
        negatives = [k for _, text in self.negatives(fields) for k in text_key(str(text))]
        return (*text_key(texts[0]), *text_key(texts[1]), 2 + len(negatives) // 2, *negatives)

    def label_id(self, raw) -> np.ndarray:
        """The label, its negatives beyond the training data's widest example left out (as its texts are)."""
        out = np.full(self.label_shape, -1, np.int32)
        kept = np.array(raw[: self.label_shape[0]], np.int32)
        out[: len(kept)] = kept
        out[4] = min(out[4], self.width)
        return out

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
        return (("width", self.width),) + ((("guide", "initial"),) if self.options.guide == "initial" else ())

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        """``[R, S, k, D]`` at each example's first slot: its k segments' unit-length embeddings (no
        parameters); with ``guide: initial`` the starting encoder's after them (``[R, S, k, 2 D]``)."""

        def stacked(x):
            u = l2_normalize(x)
            return jnp.stack([u] + [next_slot(u, j) for j in range(1, spec.option("width"))], axis=2)

        if spec.option("guide") == "initial":
            return jnp.concatenate([stacked(features.pooled), stacked(features.guide)], axis=-1)
        return stacked(features.pooled)

    def own(self, outputs):
        """The model's own embeddings of a head output (without the starting encoder's, ``guide: initial``)."""
        return outputs[..., : outputs.shape[-1] // 2] if self.options.guide == "initial" else outputs

    def loss_sums(self, outputs, y):
        both = outputs.reshape((-1,) + outputs.shape[2:]).astype(jnp.float32)
        out = self.own(both)
        guide_out = both[..., out.shape[-1] :] if self.options.guide == "initial" else None
        y = y.reshape(-1, y.shape[-1])
        texts = jnp.where(self.present(y), y[:, 4], 0)
        margin = float(self.options.guide_margin) if self.options.guide else None
        nll, correct = in_batch_loss(out, texts, margin, guide_out)
        nll *= self.weight(out.shape[-1])
        for d in self.dims:  # Matryoshka: each leading size trained as an embedding of its own
            if d < out.shape[-1]:  # (the whole embedding's loss is already in)
                nll += self.weight(d) * in_batch_loss(l2_normalize(out[..., :d]), texts, margin, guide_out)[0]
        return LossSums(jnp.sum(nll), jnp.sum(correct), jnp.sum(texts >= 2))

    def predict(self, outputs):
        return self.own(outputs)  # (query, positive, negatives)

    def values(self, outputs):
        return self.own(outputs)[:, :, 0]  # the query's embedding (unit length)

    def metrics(self, y_true, y_pred) -> dict:
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        has = [y_true[:, 4] > j for j in range(2, y_pred.shape[1])]  # which rows have a j-th text
        others = np.concatenate([y_pred[m, j] for j, m in enumerate(has, 2)] or [y_pred[:0, 0]])
        other_keys = np.concatenate(
            [y_true[m, 2 * j + 1 : 2 * j + 3] for j, m in enumerate(has, 2)] or [y_true[:0, :2]]
        )

        def ranked(d: int) -> dict:  # (retrieval_metrics re-normalises the truncated embeddings)
            cut = y_pred[..., :d]
            return retrieval_metrics(cut[:, 0], cut[:, 1], y_true[:, :2], y_true[:, 2:4], others[:, :d], other_keys)

        result = ranked(y_pred.shape[-1])
        for d in self.dims:
            result[f"ndcg@10@{d}"] = ranked(d)["ndcg@10"]
        return result

    def describe(self, result: dict) -> str:
        return f"nDCG@10 {result['ndcg@10']:.3f} MRR@10 {result['mrr@10']:.3f} R@1 {result['recall@1']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        columns = (("nDCG@10", "ndcg@10"), ("MRR@10", "mrr@10"), ("recall@1", "recall@1"), ("recall@10", "recall@10"))
        lines = self.split_table(summary, columns + (("MAP@100", "map@100"),), count="queries")
        return lines + self.sized_report(summary, count="queries")

    def output_cell(self, output) -> str:
        """The query's embedding, or (``predict --corpus``) its best match and score."""
        if isinstance(output, list):
            return f"{output[0]['text'][:16]} ({output[0]['score']:.2f})" if output else "-"
        return f"[{len(output)} numbers]"

    def output(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)
