"""The task interface: everything that differs between kinds of task lives in one object.

A :class:`Task` says which columns it reads and how a raw label becomes a label id (with
the ``file:line: reason`` of a bad one), how many outputs its head has, its per-example loss
over the labelled rows (``-1``: no label), its predictions, its metrics and the primary score
that picks the best model and stops early, its lines in report.md and its plots, and what
``predict`` gives for it. Types are found by the ``type`` key of a task in the config file
through :data:`REGISTRY`: a new type is one new module with a :func:`register`-ed class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np

from mtl_jax.config import TaskConfig
from mtl_jax.errors import MtlError
from mtl_jax.registry import registrar

REGISTRY: dict[str, type[Task]] = {}
register = registrar(REGISTRY, "type")  # @register("name"): the task type ``type: name`` of the config file


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a run; subclasses implement the methods that raise ``NotImplementedError``."""

    type: ClassVar[str] = ""
    primary: ClassVar[str] = ""  # the metric that picks the best model (higher is better)
    record_keys: ClassVar[tuple[str, ...]] = ()  # the metrics of an evaluation record in metrics.jsonl
    config: TaskConfig
    labels: tuple[str, ...] = ()  # the label names (resolved from the training data when not configured)

    @property
    def name(self) -> str:
        return self.config.name

    # ---- data

    def columns(self) -> tuple[str, ...]:
        """The columns a file of this task must have besides the text column."""
        return (self.config.label_column,)

    def with_labels(self, raw_train_labels: Iterable[str]) -> Task:
        """This task with its label names resolved from the raw labels of its training file."""
        return self

    def label_id(self, raw: str) -> int | str:
        """The id of a raw label, or the reason it is not one (a string)."""
        raise NotImplementedError

    def check_train(self, ids: np.ndarray) -> None:
        """Refuse training labels ``ids`` (this task's labelled rows) the task cannot learn from."""
        if len(ids) == 0:
            raise MtlError(f"{self.config.train}: task {self.name} has no training examples")

    # ---- head, loss and predictions (inside the jitted steps)

    @property
    def outputs(self) -> int:
        """The size of the task's head."""
        raise NotImplementedError

    def loss_sums(self, logits: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        """``{"loss_sum", "correct", "count"}`` over the rows with a label (``y >= 0``)."""
        raise NotImplementedError

    def predict(self, logits: jax.Array) -> jax.Array:
        """What evaluation compares with the labels, per row."""
        raise NotImplementedError

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """What ``Predictor.predict_proba`` returns per row."""
        raise NotImplementedError

    # ---- metrics and outputs (on the host)

    def metrics(self, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
        """Every metric of the task (its ``primary`` among them) over labelled examples."""
        raise NotImplementedError

    def score(self, result: dict) -> float:
        """The primary score of a :meth:`metrics` result."""
        return float(result[self.primary])

    def describe(self, result: dict) -> str:
        """A result in a few words for the log."""
        return f"{self.primary} {self.score(result):.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        """Its section of report.md from the run's summary (validation and test results)."""
        return []

    def plots(self, result: dict, folder: Path) -> list[str]:
        """Pictures of a test result written into ``folder``; their file names."""
        return []

    def output(self, probabilities: np.ndarray) -> Any:
        """What ``predict`` gives for one input, from its :meth:`probabilities` row."""
        raise NotImplementedError

    def export_meta(self) -> dict:
        """What the export's metadata keeps of the task, to rebuild it with :func:`from_export`."""
        return {"name": self.name, "type": self.type, "labels": list(self.labels)}


def build(config: TaskConfig, labels=None) -> Task:
    """The task object of a configured task (its ``type``, default ``classification``); ``labels``
    default to the configured ones."""
    if config.type not in REGISTRY:
        raise MtlError(f"task {config.name}: unknown type {config.type!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[config.type](config, tuple((config.labels or ()) if labels is None else labels))


def from_export(meta: dict) -> Task:
    """A task of an exported model, from :meth:`Task.export_meta`."""
    config = TaskConfig(name=meta["name"], train="", type=meta.get("type", "classification"))
    return build(config, meta.get("labels", ()))


def of_heads(heads) -> tuple[Task, ...]:
    """Classification tasks for a model's ``(name, classes)`` heads, labels named ``0, 1, ...``: what
    the steps assume when no task objects are given (tests, benchmarks)."""
    return tuple(build(TaskConfig(name, ""), map(str, range(n))) for name, n in heads)
