"""``similarity``: a similarity score per sentence pair (STS).

``encoding: bi`` (default): the cosine of the two pooled embeddings, trained with CoSENT (the
default: every pair of pairs in the batch ordered as their scores are) or ``loss: mse`` against the
score scaled to [0, 1]. ``encoding: cross``: the pair as one sequence and a one-output head, MSE
against the scaled score. The scores' range is ``score_range`` or the training scores' min and max.

Metrics: Pearson and Spearman (the primary score) between the predictions and the scores; with
``matryoshka_dims`` (bi), the loss adds each leading size's cosines and Spearman is reported at
each size too (:mod:`mtl_jax.tasks.matryoshka`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.errors import MtlError
from mtl_jax.model.heads import Features, HeadSpec, l2_normalize, next_slot
from mtl_jax.options import number_pair, option
from mtl_jax.tasks.base import LossSums, Task, register
from mtl_jax.tasks.matryoshka import Matryoshka, MatryoshkaOptions
from mtl_jax.tasks.metrics import correlations
from mtl_jax.tasks.pair import PairInput, PairOptions
from mtl_jax.tasks.regression import OneScore, masked_mse, numbers

COSENT_SCALE = 20.0  # CoSENT's lambda (as sentence-transformers' CoSENTLoss)
LOSSES = ("cosent", "mse")


def cosent(cos: jnp.ndarray, score: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """CoSENT over the valid pairs: ``log(1 + sum over (i, j) with score_i > score_j of exp(scale (cos_j - cos_i)))``."""
    diff = COSENT_SCALE * (cos[None, :] - cos[:, None])  # [i, j]: cos_j - cos_i
    ordered = valid[:, None] & valid[None, :] & (score[:, None] > score[None, :])
    logits = jnp.concatenate([jnp.zeros(1), jnp.where(ordered, diff, -1e9).reshape(-1)])
    return jax.nn.logsumexp(logits)


@dataclasses.dataclass(frozen=True)
class SimilarityOptions(PairOptions, MatryoshkaOptions):
    loss: str = option("cosent", "bi: cosent (the ranking of the pairs' cosines) or mse")
    score_range: Optional[tuple[float, float]] = option(
        None, "the scores' range [low, high] (default: the training scores' min and max)", parse=number_pair
    )


@register("similarity")
@dataclasses.dataclass(frozen=True)
class Similarity(Matryoshka, PairInput, OneScore):
    Options = SimilarityOptions
    sized = ("Spearman", "spearman")

    def __post_init__(self):
        self.check_pair()
        if self.options.loss not in LOSSES:
            raise MtlError(f"task {self.name}: unknown loss {self.options.loss!r} (similarity: cosent, mse)")
        if self.dims and self.options.encoding != "bi":
            raise MtlError(f"task {self.name}: matryoshka_dims needs encoding: bi (embeddings to cut)")
        self.check_weights()

    @property
    def record_keys(self) -> tuple[str, ...]:
        return ("loss", "pearson", "spearman") + self.sized_keys() + ("examples",)

    def with_labels(self, raw_train_labels: Iterable) -> Similarity:
        """The scores' range: ``score_range``, else the training scores' min and max."""
        if self.stats:
            return self
        if self.options.score_range:
            return dataclasses.replace(self, stats=tuple(self.options.score_range))
        y = numbers(raw_train_labels)
        lo, hi = (min(y), max(y)) if y else (0.0, 1.0)
        return dataclasses.replace(self, stats=(lo, hi if hi > lo else lo + 1.0))

    def head_options(self) -> tuple:
        return super().head_options() + (("loss", self.options.loss), ("dims", self.dims))

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        """``cross``: a one-output Dense layer; ``bi``: the cosine of the pair's embeddings (no parameters),
        then the cosine of each Matryoshka size's re-normalised first dimensions."""
        if spec.option("encoding") == "cross":
            return Task.head(spec, features)
        cosines = []
        for d in (None,) + spec.option("dims"):
            u = l2_normalize(features.pooled[..., :d])
            cosines.append(jnp.sum(u * next_slot(u), axis=-1))
        return jnp.stack(cosines, axis=-1)

    def loss_sums(self, outputs, y):
        lo, hi = self.stats
        preds, y = outputs.reshape(-1, outputs.shape[-1]).astype(jnp.float32), y.reshape(-1)
        valid = self.present(y)
        scaled = (jnp.where(valid, y, lo) - lo) / (hi - lo)
        if self.options.encoding == "bi" and self.options.loss == "cosent":
            count = jnp.sum(valid)
            loss = sum(w * cosent(preds[:, k], scaled, valid) for k, w in enumerate(self.size_weights(preds)))
            return LossSums(loss * count, jnp.zeros((), jnp.int32), count)
        sums = [masked_mse(preds[:, k], scaled, valid) for k in range(preds.shape[1])]
        return sums[0]._replace(loss_sum=sum(w * s.loss_sum for s, w in zip(sums, self.size_weights(preds))))

    def size_weights(self, preds) -> list[float]:
        """The loss weight of each column of ``preds``: the whole embedding's (1), then each size's."""
        return [1.0] + [self.weight(d) for d in self.dims][: preds.shape[1] - 1]

    def predict(self, outputs):
        """The cosine (``bi``; with Matryoshka sizes, then each size's) or the head's output mapped back
        into the score range (``cross``)."""
        lo, hi = self.stats
        if self.options.encoding == "bi":
            return outputs if self.dims else outputs[..., 0]
        return lo + outputs[..., 0] * (hi - lo)

    def values(self, outputs):
        score = self.predict(outputs)
        return score[..., :1] if self.dims else score[..., None]

    def metrics(self, y_true, y_pred) -> dict:
        """Pearson and Spearman; at each Matryoshka size too when ``y_pred`` holds a column per size
        (:meth:`predict`'s; a user's scores, one per pair, give the whole embedding's alone)."""
        y_pred = np.asarray(y_pred)
        if y_pred.ndim == 1:
            return super().metrics(y_true, y_pred)
        result = super().metrics(y_true, y_pred[:, 0])
        for k, d in enumerate(self.dims, start=1):
            result[f"spearman@{d}"] = correlations(np.asarray(y_true), y_pred[:, k])["spearman"]
        return result

    def describe(self, result: dict) -> str:
        return f"pearson {result['pearson']:.3f} spearman {result['spearman']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        lines = self.split_table(summary, (("Pearson", "pearson"), ("Spearman", "spearman")), count="pairs")
        return lines + self.sized_report(summary, count="pairs")
