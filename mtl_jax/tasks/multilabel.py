"""``multilabel``: a set of labels per sentence (topics, tags); a sigmoid per label, binary
cross-entropy, a label predicted when its probability reaches ``threshold`` (default 0.5).

The label column holds a list (JSONL, Parquet) or a text split on ``label_separator``; an empty
list is a valid label set (none apply). Metrics: micro-F1 (primary), macro-F1, per-label P/R/F1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.options import FRACTION, option
from mtl_jax.tasks.base import LossSums, PromptOptions, Task, register
from mtl_jax.tasks.metrics import multilabel_report


@dataclasses.dataclass(frozen=True)
class MultilabelOptions(PromptOptions):
    label_separator: Optional[str] = option(None, "a text label is split on this (default: a list of labels)")
    threshold: float = option(0.5, "a label is predicted when its probability reaches this", FRACTION)


@register("multilabel")
@dataclasses.dataclass(frozen=True)
class Multilabel(Task):
    primary = "micro_f1"
    record_keys = ("loss", "micro_f1", "macro_f1", "examples")
    label_dtype = np.int8
    Options = MultilabelOptions

    @property
    def label_shape(self) -> tuple[int, ...]:
        return (len(self.labels),)

    def split(self, raw) -> tuple[str, ...]:
        if isinstance(raw, tuple):
            return tuple(str(x).strip() for x in raw)
        sep = self.options.label_separator
        return tuple(x.strip() for x in (raw.split(sep) if sep else [raw]) if x.strip())

    def raw_label(self, fields: dict):
        value = fields.get(self.config.label_column)
        return value if isinstance(value, tuple) or value is None else value.strip()  # "": the empty set

    def with_labels(self, raw_train_labels: Iterable) -> Multilabel:
        if self.labels:
            return self
        return dataclasses.replace(self, labels=tuple(sorted({x for raw in raw_train_labels for x in self.split(raw)})))

    def label_id(self, raw) -> np.ndarray | str:
        names = self.split(raw)
        unknown = [x for x in names if x not in self.labels]
        if unknown:
            return f"label {unknown[0]!r} not in the labels of task {self.name} ({', '.join(self.labels)})"
        return np.isin(np.asarray(self.labels), names).astype(np.int8)

    @property
    def outputs(self) -> int:
        return len(self.labels)

    def loss_sums(self, logits, y):
        z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
        y = y.reshape(-1, y.shape[-1])
        valid = self.present(y)
        t = jnp.maximum(y, 0).astype(jnp.float32)
        bce = jnp.mean(jnp.maximum(z, 0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z))), axis=-1)
        exact = jnp.all((z >= jax.scipy.special.logit(self.options.threshold)) == (t > 0), axis=-1)
        return LossSums(jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid & exact), jnp.sum(valid))

    def predict(self, logits):
        return (jax.nn.sigmoid(logits) >= self.options.threshold).astype(jnp.int8)

    def values(self, logits):
        return jax.nn.sigmoid(logits)

    def metrics(self, y_true, y_pred) -> dict:
        return multilabel_report(np.asarray(y_true), np.asarray(y_pred), self.labels)

    def describe(self, result: dict) -> str:
        return f"micro-F1 {result['micro_f1']:.3f} macro-F1 {result['macro_f1']:.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        lines = self.split_table(summary, (("micro-F1", "micro_f1"), ("macro-F1", "macro_f1")))
        return lines + [""] + self.label_table(summary)

    def output_cell(self, output: dict) -> str:
        return ",".join(output["labels"]) or "-"

    def output(self, values: np.ndarray) -> dict:
        chosen = [name for name, p in zip(self.labels, values) if p >= self.options.threshold]
        return {"labels": chosen, "probs": {name: float(p) for name, p in zip(self.labels, values)}}
