"""``classification``: one label per sentence out of a fixed set; softmax cross-entropy.

Metrics: accuracy, per-class precision / recall / F1, the confusion matrix, and macro-F1,
the primary score.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.errors import MtlError
from mtl_jax.options import option
from mtl_jax.tasks.base import LossSums, PromptOptions, Task, register
from mtl_jax.tasks.metrics import classification_report, confusion_matrix, confusion_report


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: str
    probs: dict[str, float]


def as_number(raw: str) -> str | None:
    """A label written as a finite number, in one spelling (``1``, ``1.0``, ``1e0``: ``1``; ``0.5``), or None."""
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


@dataclasses.dataclass(frozen=True)
class ClassificationOptions(PromptOptions):
    metric: Optional[str] = option(None, "the primary metric: accuracy, macro_f1 (default), f1 (binary), mcc")


@register("classification")
@dataclasses.dataclass(frozen=True)
class Classification(Task):
    metrics_named: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "f1", "mcc")
    Options = ClassificationOptions

    def __post_init__(self):
        metric = getattr(self.options, "metric", None)
        if metric not in (None,) + self.metrics_named:
            known = ", ".join(self.metrics_named)
            raise MtlError(f"task {self.name}: unknown metric {metric!r} (classification: {known})")

    @property
    def primary(self) -> str:
        return self.options.metric or "macro_f1"

    @property
    def record_keys(self) -> tuple[str, ...]:
        extra = () if self.primary in ("accuracy", "macro_f1") else (self.primary,)
        return ("loss", "accuracy", "macro_f1") + extra + ("examples",)

    def with_labels(self, raw_train_labels: Iterable[str]) -> Classification:
        """Configured ``labels``, else the sorted (mapped) values of the training file; values that are
        all numbers are one label per number (``1``, ``1.0`` and ``1e0`` are ``1``), in numeric order."""
        if self.labels:
            return self
        mapping = self.config.label_map or {}
        names = {mapping.get(r, r) for r in raw_train_labels}
        numbers = {as_number(n) for n in names}
        if names and None not in numbers:
            return dataclasses.replace(self, labels=tuple(sorted(numbers, key=float)))
        return dataclasses.replace(self, labels=tuple(sorted(names)))

    @functools.cached_property
    def numeric(self) -> bool:
        """Whether the label names are numbers (then a raw label is read as a number too)."""
        return bool(self.labels) and all(as_number(n) == n for n in self.labels)

    def export_meta(self) -> dict:
        """The export says how the labels were read: as numbers (``labels_are_numbers``) or as text."""
        return super().export_meta() | {"labels_are_numbers": self.numeric}

    def label_id(self, raw) -> int | str:
        if not isinstance(raw, str):
            return f"expected one label, got {raw!r}"
        label = (self.config.label_map or {}).get(raw, raw)
        if self.numeric:
            label = as_number(label) or label
        if label not in self.labels:
            return f"label {raw!r} not in the labels of task {self.name} ({', '.join(self.labels)})"
        return self.labels.index(label)

    def check_train(self, ids: np.ndarray) -> None:
        super().check_train(ids)
        present = int((np.bincount(ids, minlength=len(self.labels)) > 0).sum())
        if present < 2:
            raise MtlError(
                f"{self.config.train}: task {self.name} needs at least two classes in its training data, found {present}"
            )

    def strata(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.int64)

    @property
    def outputs(self) -> int:
        return len(self.labels)

    def loss_sums(self, logits, y):
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)  # one row per slot
        valid = y >= 0
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B, C]
        nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
        correct = jnp.sum(valid & (jnp.argmax(logp, axis=-1) == y))
        return LossSums(jnp.sum(jnp.where(valid, nll, 0.0)), correct, jnp.sum(valid))

    def predict(self, logits):
        return jnp.argmax(logits, axis=-1)

    def values(self, logits):
        return jax.nn.softmax(logits, axis=-1)

    def metrics(self, y_true, y_pred) -> dict:
        return classification_report(y_true, y_pred, self.labels)

    def metric_state(self) -> np.ndarray:
        """The split's confusion matrix, summed batch by batch: nothing per example is kept."""
        return np.zeros((len(self.labels),) * 2, np.int64)

    def add_to_metrics(self, state, idx, y_true, y_pred) -> np.ndarray:
        return state + confusion_matrix(y_true, y_pred, len(self.labels))

    def finish_metrics(self, state, empty) -> dict:
        return confusion_report(state, self.labels)

    def describe(self, result: dict) -> str:
        extra = "" if self.primary in ("accuracy", "macro_f1") else f" {self.primary} {self.score(result):.3f}"
        return f"acc {result['accuracy']:.3f} F1 {result['macro_f1']:.3f}{extra}"

    def report_lines(self, summary: dict) -> list[str]:
        lines = self.split_table(summary, (("accuracy", "accuracy"), ("macro-F1", "macro_f1")))
        return lines + [""] + self.label_table(summary) + ["", f"![confusion](confusion_{self.name}.png)"]

    def plots(self, result: dict, folder: Path) -> list[str]:
        from mtl_jax.outputs.plots import plot_confusion

        name = f"confusion_{self.name}.png"
        plot_confusion(result["confusion"], self.labels, f"{self.name} (test)", folder / name)
        return [name]

    def output_json(self, output: Prediction) -> dict:
        return {"label": output.label, "probs": output.probs}

    def output_cell(self, output: Prediction) -> str:
        return f"{output.label} ({output.probs[output.label]:.2f})"

    def output(self, values: np.ndarray) -> Prediction:
        p = values
        return Prediction(self.labels[int(np.argmax(p))], {label: float(x) for label, x in zip(self.labels, p)})
