"""``similarity``: a similarity score per sentence pair (STS).

``encoding: bi`` (default): the cosine of the two pooled embeddings, trained with CoSENT (the
default: every pair of pairs in the batch ordered as their scores are) or ``loss: mse`` against the
score scaled to [0, 1]. ``encoding: cross``: the pair as one sequence and a one-output head, MSE
against the scaled score. The scores' range is ``score_range`` or the training scores' min and max.

Metrics: Pearson and Spearman (the primary score) between the predictions and the scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from mtl_jax.errors import MtlError
from mtl_jax.tasks.base import Features, HeadSpec, Task, next_slot, register
from mtl_jax.tasks.pair import PairInput
from mtl_jax.tasks.regression import OneScore, masked_mse, numbers

COSENT_SCALE = 20.0  # CoSENT's lambda (as sentence-transformers' CoSENTLoss)
LOSSES = ("cosent", "mse")


def cosent(cos: jnp.ndarray, score: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """CoSENT over the valid pairs: ``log(1 + sum over (i, j) with score_i > score_j of exp(scale (cos_j - cos_i)))``."""
    diff = COSENT_SCALE * (cos[None, :] - cos[:, None])  # [i, j]: cos_j - cos_i
    ordered = valid[:, None] & valid[None, :] & (score[:, None] > score[None, :])
    logits = jnp.concatenate([jnp.zeros(1), jnp.where(ordered, diff, -1e9).reshape(-1)])
    return jax.nn.logsumexp(logits)


@register("similarity")
@dataclasses.dataclass(frozen=True)
class Similarity(PairInput, OneScore):
    record_keys = ("loss", "pearson", "spearman", "examples")

    def __post_init__(self):
        self.check_pair()
        if (self.config.loss or "cosent") not in LOSSES:
            raise MtlError(f"task {self.name}: unknown loss {self.config.loss!r} (similarity: cosent, mse)")

    def with_labels(self, raw_train_labels: Iterable) -> Similarity:
        """The scores' range: ``score_range``, else the training scores' min and max."""
        if self.stats:
            return self
        if self.config.score_range:
            return dataclasses.replace(self, stats=tuple(self.config.score_range))
        y = numbers(raw_train_labels)
        lo, hi = (min(y), max(y)) if y else (0.0, 1.0)
        return dataclasses.replace(self, stats=(lo, hi if hi > lo else lo + 1.0))

    def head_options(self) -> tuple:
        return super().head_options() + (("loss", self.config.loss or "cosent"),)

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        """``cross``: a one-output Dense layer; ``bi``: the cosine of the pair's embeddings (no parameters)."""
        from mtl_jax.model.multitask import l2_normalize  # (the model imports the tasks)

        if spec.option("encoding") == "cross":
            return Task.head(spec, features)
        u = l2_normalize(features.pooled)
        return jnp.sum(u * next_slot(u), axis=-1, keepdims=True)

    def loss_sums(self, outputs, y):
        lo, hi = self.stats
        pred, y = outputs[..., 0].reshape(-1).astype(jnp.float32), y.reshape(-1)
        valid = self.present(y)
        scaled = (jnp.where(valid, y, lo) - lo) / (hi - lo)
        if self.config.encoding == "bi" and (self.config.loss or "cosent") == "cosent":
            count = jnp.sum(valid)
            return {
                "loss_sum": cosent(pred, scaled, valid) * count,
                "correct": jnp.zeros((), jnp.int32),
                "count": count,
            }
        return masked_mse(pred, scaled, valid)

    def predict(self, outputs):
        """The cosine (``bi``) or the head's output mapped back into the score range (``cross``)."""
        lo, hi = self.stats
        return outputs[..., 0] if self.config.encoding == "bi" else lo + outputs[..., 0] * (hi - lo)

    def describe(self, result: dict) -> str:
        return f"pearson {result['pearson']:.3f} spearman {result['spearman']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        return self.split_table(summary, (("Pearson", "pearson"), ("Spearman", "spearman")), count="pairs")
