"""``regression``: a number per sentence; one output, trained with MSE on the standardised target.

Metrics: Pearson and Spearman correlation (scipy's) and the RMSE in the target's units; Spearman is
the primary score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from mtl_jax.tasks.base import LossSums, PromptOptions, Task, register
from mtl_jax.tasks.metrics import correlations


def parse_number(raw, what: str = "score") -> float | str:
    """A finite number, or the reason ``raw`` is not one."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return f"{what} {raw!r} is not a number"
    return value if math.isfinite(value) else f"{what} {raw!r} is not a finite number"


def numbers(raws: Iterable) -> list[float]:
    """The raw labels that are numbers (the others are refused row by row, with their lines)."""
    return [v for v in map(parse_number, raws) if not isinstance(v, str)]


def masked_mse(pred: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray) -> dict:
    """The summed squared error over the ``valid`` rows (no notion of correct)."""
    err = jnp.where(valid, pred - jnp.where(valid, target, 0.0), 0.0)
    return LossSums(jnp.sum(err * err), jnp.zeros((), jnp.int32), jnp.sum(valid))


class OneScore(Task):
    """What the types that predict one number per example share (regression, similarity): a numeric
    label, one output, the prediction as its values, Pearson and Spearman (primary)."""

    primary = "spearman"
    label_dtype = np.float32
    train_accuracy = False
    Options = PromptOptions

    def label_id(self, raw) -> float | str:
        return parse_number(raw)

    @property
    def outputs(self) -> int:
        return 1

    def values(self, outputs):
        return self.predict(outputs)[..., None]

    def metrics(self, y_true, y_pred) -> dict:
        return correlations(y_true, y_pred)

    def output_cell(self, output: float) -> str:
        return f"{output:.3f}"

    def output(self, values: np.ndarray) -> float:
        return float(values[0])


@register("regression")
@dataclasses.dataclass(frozen=True)
class Regression(OneScore):
    record_keys = ("loss", "pearson", "spearman", "rmse", "examples")

    def with_labels(self, raw_train_labels: Iterable) -> Regression:
        """The training targets' mean and standard deviation (the loss is on the standardised target)."""
        if self.stats:
            return self
        y = np.asarray(numbers(raw_train_labels), np.float64)
        mean, std = (float(y.mean()), float(y.std())) if len(y) else (0.0, 1.0)
        return dataclasses.replace(self, stats=(mean, std if std > 0 else 1.0))

    def loss_sums(self, outputs, y):
        mean, std = self.stats
        return masked_mse(outputs[..., 0].astype(jnp.float32), (y - mean) / std, self.present(y))

    def predict(self, outputs):
        mean, std = self.stats
        return outputs[..., 0] * std + mean

    def metrics(self, y_true, y_pred) -> dict:
        out = super().metrics(y_true, y_pred)
        out["rmse"] = float(np.sqrt(np.mean((np.asarray(y_pred, np.float64) - y_true) ** 2))) if len(y_true) else 0.0
        return out

    def describe(self, result: dict) -> str:
        return f"spearman {result['spearman']:.3f} rmse {result['rmse']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        return self.split_table(summary, (("Pearson", "pearson"), ("Spearman", "spearman"), ("RMSE", "rmse")))
