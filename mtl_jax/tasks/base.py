"""The task interface: everything that differs between kinds of task lives in one object.

A :class:`Task` says which columns it reads and what text a row makes (a sentence, a pair's
segments, words), how a raw label becomes a label (with the ``file:line: reason`` of a bad one)
and how its labels are stored (dtype, shape, "no label"), what head it has (built inside the
model by :meth:`Task.head`), its loss over the labelled rows, its predictions, its metrics and
the primary score that picks the best model and stops early, its lines in report.md and its
plots, and what ``predict`` gives for it. Types are found by the ``type`` key of a task in the config file
through :data:`REGISTRY`: a new type is one new module with a :func:`register`-ed class, and its
options (a frozen dataclass of :func:`mtl_jax.options.option` fields, the class's ``Options``) are
config keys of its tasks, checked, exported and read back without other changes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.packing import by_range
from mtl_jax.data.readers import option_names as reader_options
from mtl_jax.errors import MtlError
from mtl_jax.model.heads import Features, HeadSpec, slot_head
from mtl_jax.options import declared, option, parsed
from mtl_jax.registry import registrar
from mtl_jax.tasks.config import TaskConfig

DROP = "<drop>"  # a raw label of drop_labels: the row is left out for that task
REGISTRY: dict[str, type[Task]] = {}
register = registrar(REGISTRY, "type")  # @register("name"): the task type ``type: name`` of the config file


class LossSums(NamedTuple):
    """A task's loss over a batch's labelled rows (slots, tokens), as sums: the mean is ``loss_sum / count``."""

    loss_sum: jax.Array  # float32
    correct: jax.Array  # int32: rows predicted right (0 where the type has no notion of right)
    count: jax.Array  # int32: labelled rows


def no_label_like(dtype) -> Any:
    """The "no label" value of a label array: -1 for integers, NaN for floats, None for per-word tags."""
    dtype = np.dtype(dtype)
    if dtype.kind == "O":
        return None
    return np.nan if np.issubdtype(dtype, np.floating) else -1


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a type that declares none."""


def prompt_pairs(value) -> tuple[tuple[str, str], ...]:
    """``prompts``: a mapping (or pairs) of a text column to the text put before its texts."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise ValueError(f"expected a mapping of column to prompt text, got {value!r}") from None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs):
        raise ValueError(f"expected a mapping of column to prompt text, got {value!r}")
    return pairs


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """What every type with sentence columns takes: a prompt per text column."""

    prompts: Optional[tuple[tuple[str, str], ...]] = option(
        None,
        'per text column, a text put before each of its texts ({query: "query: "}), in training, evaluation '
        "and prediction; the export keeps them as sentence-transformers' prompts",
        parse=prompt_pairs,
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a run; subclasses implement the methods that raise ``NotImplementedError``."""

    type: ClassVar[str] = ""
    primary: ClassVar[str] = ""  # the metric that picks the best model (higher is better)
    record_keys: ClassVar[tuple[str, ...]] = ()  # the metrics of an evaluation record in metrics.jsonl
    segments: ClassVar[int] = 1  # texts per example encoded separately (consecutive slots of one row)
    token_level: ClassVar[bool] = False  # a label per token (its outputs and labels are [R, P, ...])
    label_dtype: ClassVar[Any] = np.int32  # the dtype of its label array (object: per-word tags)
    label_shape: ClassVar[tuple[int, ...]] = ()  # one example's label shape
    train_accuracy: ClassVar[bool] = True  # the train records give the "correct" count as accuracy
    ranks_corpus: ClassVar[bool] = False  # predict --corpus ranks a corpus by its values (unit embeddings)
    distinct_in_batch: ClassVar[bool] = False  # a step never holds one of its texts twice (in-batch negatives)
    Options: ClassVar[type] = NoOptions  # the type's own options (config keys of its tasks)
    config: TaskConfig
    labels: tuple[str, ...] = ()  # the label names (resolved from the training data when not configured)
    stats: tuple[float, ...] = ()  # numbers resolved from the training data (regression: mean, std)

    @property
    def name(self) -> str:
        return self.config.name

    @functools.cached_property
    def options(self):
        """The type's options (an ``Options``): the task's config values, the rest at their defaults."""
        names = {f.name for f in declared(self.Options)}
        return self.Options(**parsed(self.Options, {k: v for k, v in self.config.options.items() if k in names}))

    # ---- data

    def text_columns(self) -> tuple[str, ...]:
        """The columns that make an example's text (see :meth:`text`)."""
        return (self.config.text_column,)

    def columns(self) -> tuple[str, ...]:
        """The columns a file of this task must have besides the text columns."""
        return (self.config.label_column,)

    def optional_columns(self) -> tuple[str, ...]:
        """Columns read where a file has them (retrieval's hard negatives: evaluation files need none)."""
        return ()

    def text(self, fields: dict) -> Any:
        """An example's text from its row's fields: a string here (one sentence; see
        :mod:`mtl_jax.data.text` for the other kinds), or :class:`BadText` with the reason."""
        return self.prompted(check_text(fields.get(self.config.text_column), self.config.text_column))

    @functools.cached_property
    def prompts(self) -> dict[str, str]:
        """The configured prompt of each text column (``prompts``; read for every text)."""
        return dict(getattr(self.options, "prompts", None) or ())

    def prompted(self, text, column: str | None = None):
        """``text`` (of ``column``, default the task's text column) behind its column's prompt."""
        if isinstance(text, BadText) or not isinstance(text, str):
            return text
        return self.prompts.get(self.config.text_column if column is None else column, "") + text

    @property
    def text_kind(self) -> str:
        """What :meth:`text` makes of a row (tasks of one file with the same kind and columns share rows)."""
        return "sentence"

    # ---- prediction inputs

    @property
    def input_kind(self) -> str:
        """What :meth:`input_text` makes of an input (tasks of one kind share a forward pass)."""
        return self.text_kind

    def accepts(self, value) -> bool:
        """Whether ``predict`` gives this task's output for ``value`` (here: a sentence)."""
        return isinstance(value, str)

    def input_text(self, value) -> Any:
        """An input of ``predict`` as the text an example of this task has (its prompt before it)."""
        return self.prompted(value)

    def corpus_text(self, value) -> Any:
        """A text of ``predict --corpus`` as this task ranks it (retrieval: a passage)."""
        return self.input_text(value)

    def raw_label(self, fields: dict) -> Any:
        """A row's raw label: None when missing (empty, NaN), :data:`DROP` for a ``drop_labels`` value."""
        value = fields.get(self.config.label_column)
        if isinstance(value, tuple):
            return value
        value = None if value is None or value.strip().lower() in ("", "nan") else value.strip()
        return DROP if value is not None and value in self.config.drop_labels else value

    def check_batch(self, examples_per_step: int) -> None:
        """Refuse a batch size the task cannot train with (retrieval: two pairs at least)."""

    def check_encoder(self, dim: int) -> None:
        """Refuse an encoder whose embedding size (``dim``) the task cannot use (retrieval: Matryoshka sizes)."""

    def check_row(self, text, raw) -> str | None:
        """Why a row's text and raw label do not go together (tagging: as many tags as words), or None."""
        return None

    def with_labels(self, raw_train_labels: Iterable) -> Task:
        """This task with its label names resolved from the raw labels of its training file."""
        return self

    def label_id(self, raw) -> Any:
        """The label of a raw value (its id, a number, an array), or the reason it is not one (a string)."""
        raise NotImplementedError

    @property
    def no_label(self) -> Any:
        return no_label_like(self.label_dtype)

    @property
    def batch_no_label(self) -> Any:
        """ "No label" in a batch's arrays (per-word tags travel as per-token ids: -1)."""
        return -1 if self.token_level else self.no_label

    def empty_labels(self, n: int) -> np.ndarray:
        """``n`` rows of "no label"."""
        return np.full((n,) + self.label_shape, self.no_label, self.label_dtype)

    def check_train(self, y: np.ndarray) -> None:
        """Refuse training labels ``y`` (this task's labelled rows) the task cannot learn from."""
        if len(y) == 0:
            raise MtlError(f"{self.config.train}: task {self.name} has no training examples")

    def strata(self, y: np.ndarray) -> np.ndarray:
        """Integer groups the validation / test split keeps in proportion (``y``: all rows of the file)."""
        return np.zeros(len(y), np.int64)

    # ---- head, loss and predictions (inside the jitted steps)

    @property
    def outputs(self) -> int:
        """The size of the task's head."""
        raise NotImplementedError

    def head_spec(self) -> HeadSpec:
        return HeadSpec(self.name, self.outputs, type(self).head, self.head_options(), self.token_level)

    def head_options(self) -> tuple:
        return ()

    @staticmethod
    def head(spec: HeadSpec, features: Features) -> jax.Array:
        """The head's outputs, built inside the model (a Flax compact context): here a Dense layer over
        each slot's pooled embedding, ``[R, S, outputs]``."""
        return slot_head(spec, features)

    def present(self, y: jax.Array) -> jax.Array:
        """Which rows (slots, tokens) of a label array ``[..., *label_shape]`` carry a label."""
        return marks_label(y.reshape(y.shape[: y.ndim - len(self.label_shape)] + (-1,))[..., 0])

    def count(self, y: jax.Array) -> jax.Array:
        """How many labelled rows ``y`` holds: the denominator of the task's mean loss."""
        return jnp.sum(self.present(y))

    def loss_sums(self, outputs: jax.Array, y: jax.Array) -> LossSums:
        """The loss over the rows that carry a label (see :meth:`present`)."""
        raise NotImplementedError

    def predict(self, outputs: jax.Array) -> jax.Array:
        """What evaluation compares with the labels, per slot (per token)."""
        raise NotImplementedError

    def values(self, outputs: jax.Array) -> jax.Array:
        """What ``Predictor.predict_proba`` returns per slot: class probabilities, a score, or (retrieval) an
        embedding."""
        raise NotImplementedError

    # ---- metrics and outputs (on the host)

    def metrics(self, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
        """Every metric of the task (its ``primary`` among them) over labelled examples."""
        raise NotImplementedError

    def metric_state(self):
        """What evaluation keeps of a split as its batches go (:meth:`add_to_metrics`): by default each
        labelled example's index, label and prediction; a type whose metrics come from sums keeps those."""
        return []

    def add_to_metrics(self, state, idx: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray):
        """``state`` with one batch's labelled examples (``idx``: their places in the split)."""
        state.append((idx, y_true, y_pred))
        return state

    def finish_metrics(self, state, empty: np.ndarray) -> dict:
        """:meth:`metrics` of every example added, in the split's order (``empty``: no labels, for none)."""
        if not state:
            return self.metrics(empty, empty)
        idx, y_true, y_pred = (np.concatenate(part) for part in zip(*state))
        order = np.argsort(idx, kind="stable")
        return self.metrics(y_true[order], y_pred[order])

    def score(self, result: dict) -> float:
        """The primary score of a :meth:`metrics` result."""
        return float(result[self.primary])

    def describe(self, result: dict) -> str:
        """A result in a few words for the log."""
        return f"{self.primary} {self.score(result):.3f}"

    def report_lines(self, summary: dict) -> list[str]:
        """Its section of report.md from the run's summary (validation and test results)."""
        return []

    def split_table(self, summary: dict, columns: tuple, count: str = "examples") -> list[str]:
        """A report.md table of the validation and test results: a column per ``(header, metric key)``."""
        lines = ["| split | " + " | ".join(h for h, _ in columns) + f" | {count} |", "|---" * (len(columns) + 2) + "|"]
        for split in ("validation", "test"):
            r = summary[split][self.name]
            lines.append(f"| {split} | " + " | ".join(f"{r[k]:.3f}" for _, k in columns) + f" | {r['examples']} |")
        return lines

    def label_table(self, summary: dict) -> list[str]:
        """A report.md table of the test result per label: precision, recall, F1 and support."""
        r = summary["test"][self.name]
        lines = ["| label (test) | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name in self.labels:
            cells = f"{r['precision'][name]:.3f} | {r['recall'][name]:.3f} | {r['class_f1'][name]:.3f}"
            lines.append(f"| {name} | {cells} | {r['support'][name]} |")
        return lines

    def plots(self, result: dict, folder: Path) -> list[str]:
        """Pictures of a test result written into ``folder``; their file names."""
        return []

    def output(self, values: np.ndarray) -> Any:
        """What ``predict`` gives for one input, from its :meth:`values` row."""
        raise NotImplementedError

    def output_json(self, output) -> Any:
        """An :meth:`output` as ``predict``'s JSON lines give it."""
        return output.tolist() if hasattr(output, "tolist") else output

    def output_cell(self, output) -> str:
        """An :meth:`output` in a cell of ``predict --format table``."""
        return str(output)

    def export_meta(self) -> dict:
        """What the export's metadata keeps of the task, to rebuild it with :func:`from_export`: its
        type's options beside its name, type, labels and numbers."""
        options = {f.name: getattr(self.options, f.name) for f in declared(self.Options)}
        return {"name": self.name, "type": self.type, "labels": list(self.labels), "stats": list(self.stats)} | {
            k: list(v) if isinstance(v, tuple) else v for k, v in options.items() if v is not None
        }


def prompts_of(tasks) -> dict[str, str]:
    """Every task's prompts by column: what the export names them (one text per column name)."""
    out: dict[str, str] = {}
    for t in tasks:
        for column, text in t.prompts.items():
            if out.setdefault(column, text) != text:
                raise MtlError(
                    f"task {t.name}: prompt {text!r} for column {column!r}, another task has {out[column]!r}"
                )
    return out


def has_label(y: np.ndarray) -> np.ndarray:
    """``[N]`` bool: which examples of a host label array ``[N, ...]`` carry a label (see :func:`no_label_like`)."""
    if y.dtype == object:
        return np.fromiter((v is not None for v in y), bool, len(y))
    first = (0,) * (y.ndim - 1)  # an example's first label entry; a store's labels read a range at a time
    return by_range(len(y), lambda a, b: marks_label(y[(slice(a, b), *first)]), bool, y)


def marks_label(first):
    """Whether each first label entry (host or device array) marks a label: not NaN (numbers), >= 0 (ids)."""
    xp = np if isinstance(first, np.ndarray) else jnp
    return ~xp.isnan(first) if xp.issubdtype(first.dtype, xp.floating) else first >= 0


class BadText(str):
    """Why a row has no usable text (a reason, not a text)."""


UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, as the readers decode it (surrogateescape)


def check_text(text: str | None, column: str) -> str:
    """``text``, or :class:`BadText` when it is empty or not valid UTF-8."""
    if text is None or not str(text).strip():
        return BadText(f"empty text in column {column!r}")
    if UNDECODED.search(text):
        return BadText("invalid UTF-8")
    return text


def known_keys(type_name: str) -> list[str]:
    """The keys a task of type ``type_name`` may have: the common ones, its type's options, the readers'."""
    common = [f.name for f in dataclasses.fields(TaskConfig) if f.name != "options"]
    own = [f.name for f in declared(REGISTRY[type_name].Options)] if type_name in REGISTRY else []
    return common + own + sorted(reader_options() - set(own))


def build(config: TaskConfig, labels=None) -> Task:
    """The task object of a configured task (its ``type``, default ``classification``); ``labels``
    default to the configured ones. Options no type or reader declares are refused."""
    if config.type not in REGISTRY:
        raise MtlError(f"task {config.name}: unknown type {config.type!r}; known: {', '.join(REGISTRY)}")
    unknown = sorted(set(config.options) - set(known_keys(config.type)))
    if unknown:
        raise MtlError(
            f"task {config.name}: unknown key(s) {', '.join(unknown)} for type {config.type}; "
            f"known: {', '.join(known_keys(config.type))}"
        )
    task = REGISTRY[config.type](config, tuple((config.labels or ()) if labels is None else labels))
    columns = task.text_columns() + task.optional_columns()
    stray = [c for c in task.prompts if c not in columns]
    if stray:
        raise MtlError(f"task {config.name}: prompts for {', '.join(stray)}, not a text column ({', '.join(columns)})")
    return task


def from_export(meta: dict) -> Task:
    """A task of an exported model, from :meth:`Task.export_meta`."""
    type_name = meta.get("type", "classification")
    own = {f.name for f in declared(REGISTRY[type_name].Options)} if type_name in REGISTRY else set()
    config = TaskConfig(meta["name"], "", type=type_name, options={k: v for k, v in meta.items() if k in own})
    return dataclasses.replace(build(config, meta.get("labels", ())), stats=tuple(meta.get("stats", ())))
