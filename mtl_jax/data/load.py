"""Data: every task's files read (:mod:`mtl_jax.data.readers`, and the embedded corpora),
validated with ``file:line: reason`` errors, label vocabularies and seeded stratified
splits. (Tokens, sampling and batches: ``mtl_jax.data.batching``.)

An example carries one label per task; ``-1`` means "no label for this task" (the
default case: each task has its own dataset). Tasks that read the same file share
its rows, so one example can carry labels for several tasks.
"""

from __future__ import annotations

import pickle
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from mtl_jax.data.assets import embedded_data_file
from mtl_jax.data.readers import Row, read_rows
from mtl_jax.errors import MtlError
from mtl_jax.tasks import Task, TaskConfig, build
from mtl_jax.tasks.base import DROP, BadText, has_label

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_ERRORS_SHOWN = 20


def resolve_path(spec: str) -> Path:
    if spec.startswith("embedded:"):
        return embedded_data_file(spec[len("embedded:") :])
    return Path(spec).expanduser()


# ---------------------------------------------------------------------------- datasets


@dataclass
class Examples:
    """Texts (a string, or a kind of :mod:`mtl_jax.data.text`; or, read for the token store, each
    example's unit in the spool its texts were tokenized into), each task's labels (its "no label"
    where unlabelled), and the file each example came from."""

    texts: list | np.ndarray
    labels: dict[str, np.ndarray]  # task -> [N, *label_shape] (tagging: [N] object, per-word tag ids)
    source: np.ndarray  # [N] int32 index into TaskData.sources

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Examples:
        texts = self.texts[idx] if isinstance(self.texts, np.ndarray) else [self.texts[i] for i in idx]
        return Examples(texts, {k: v[idx] for k, v in self.labels.items()}, self.source[idx])

    @staticmethod
    def concat(parts: Sequence[Examples], tasks: Sequence[Task]) -> Examples:
        if not parts:
            return Examples([], {t.name: t.empty_labels(0) for t in tasks}, np.zeros((0,), np.int32))
        if len(parts) == 1:
            return parts[0]
        spooled = any(isinstance(p.texts, np.ndarray) for p in parts)
        return Examples(
            np.concatenate([np.asarray(p.texts, np.int64) for p in parts])
            if spooled
            else [t for p in parts for t in p.texts],
            {t.name: np.concatenate([p.labels[t.name] for p in parts]) for t in tasks},
            np.concatenate([p.source for p in parts]),
        )


class OfTasks:
    """What a run's data says of its tasks (``tasks``: their label names resolved)."""

    tasks: tuple[Task, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """Each task's label names."""
        return {t.name: t.labels for t in self.tasks}


@dataclass
class TaskData(OfTasks):
    """The three splits, the tasks (their label names resolved), and what was dropped."""

    tasks: tuple[Task, ...]
    splits: dict[str, Examples]
    sources: list[str]
    notes: list[str] = field(default_factory=list)


class BadRows(MtlError):
    """Bad input rows: the message lists ``file:line: reason`` for each (up to a limit)."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_ERRORS_SHOWN]
        more = len(problems) - len(shown)
        tail = [f"... and {more} more bad rows"] if more else []
        super().__init__("\n".join(shown + tail + [f"{len(problems)} bad rows; fix them or pass --skip-bad-rows"]))
        self.problems = problems


class Reason(Enum):
    """Why a row is bad: the kind counted in the notes of a ``--skip-bad-rows`` run."""

    MALFORMED = "malformed record"
    EMPTY_TEXT = "empty text"
    INVALID_UTF8 = "invalid UTF-8"
    MISSING_LABEL = "missing label"
    UNKNOWN_LABEL = "label not in labels"


@dataclass
class Problems:
    """Bad rows met so far: listed (``file:line: detail``) or, with ``skip``, counted by reason."""

    skip: bool
    listed: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def add(self, where: str, reason: Reason, detail: str) -> None:
        if self.skip:
            self.skipped[reason.value] += 1
        else:
            self.listed.append(f"{where}: {detail}")


class Spilled:
    """Rows (any picklable values) kept on disk a chunk at a time, read back in order: a file's raw
    labels, held until the label names are known, without a Python object per row in memory."""

    def __init__(self):
        self.file = tempfile.TemporaryFile()
        self.count = 0

    def extend(self, rows: list) -> None:
        pickle.dump(rows, self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.count += len(rows)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        self.file.seek(0)
        while True:
            try:
                chunk = pickle.load(self.file)
            except EOFError:
                return
            yield from chunk


@dataclass
class FileRows:
    """The good rows of one file, for the tasks that read it: text (or its spooled unit), raw label
    per task, line."""

    texts: list | np.ndarray
    raw: Spilled  # [row][task of the group]: raw label, or DROP
    lines: np.ndarray


Sink = Callable[[list], np.ndarray]  # a chunk of texts -> the units they were spooled as
CHUNK_ROWS = 8192  # rows handed to the sink at a time


def _row_problem(row: Row, text, raw_labels: list, group: list[Task]) -> tuple[Reason, str] | None:
    if row.problem is not None:
        return Reason.MALFORMED, row.problem
    if isinstance(text, BadText):
        return (Reason.INVALID_UTF8 if text == "invalid UTF-8" else Reason.EMPTY_TEXT), str(text)
    if None in raw_labels:
        return Reason.MISSING_LABEL, f"missing label in column {group[raw_labels.index(None)].config.label_column!r}"
    for t, raw in zip(group, raw_labels):
        reason = None if raw == DROP else t.check_row(text, raw)
        if reason is not None:
            return Reason.MALFORMED, reason
    return None


def _read_task_file(path: Path, group: list[Task], problems: Problems, notes: list[str], sink: Sink | None) -> FileRows:
    """The rows of one file that the tasks of ``group`` read (they share its text columns), a chunk
    at a time: each chunk's texts go to ``sink`` (kept as they are without one)."""
    label_cols = [t.config.label_column for t in group]
    columns = list(dict.fromkeys(c for t in group for c in t.text_columns() + t.columns()))
    optional = list(dict.fromkeys(c for t in group for c in t.optional_columns()))
    kept, raw, lines = [], Spilled(), []  # per chunk: its texts (or units), its raw labels (on disk), its lines
    chunk: tuple[list, list, list] = ([], [], [])  # the rows read since: texts, raw labels, lines
    dropped: Counter = Counter()

    def flush():
        texts, labels, at = chunk
        kept.append(list(texts) if sink is None else sink(list(texts)))
        raw.extend(labels)
        lines.append(np.asarray(at, np.int64))
        for part in chunk:
            part.clear()

    for row in read_rows(path, columns, group[0].config.format, group[0].config.options, optional):
        raw_labels = [t.raw_label(row.fields) for t in group]
        if row.problem is None and all(r == DROP for r in raw_labels):
            dropped[row.fields.get(label_cols[0])] += 1
            continue
        text = group[0].text(row.fields) if row.problem is None else None
        problem = _row_problem(row, text, raw_labels, group)
        if problem is not None:
            problems.add(f"{path}:{row.line}", *problem)
            continue
        for part, value in zip(chunk, (text, raw_labels, row.line)):
            part.append(value)
        if len(chunk[0]) == CHUNK_ROWS:
            flush()
    flush()
    notes += [f"{path.name}: left out {n} rows labelled {value!r} (drop_labels)" for value, n in dropped.items()]
    joined = [t for part in kept for t in part] if sink is None else np.concatenate(kept)
    return FileRows(joined, raw, np.concatenate(lines))


def _label_ids(
    path: Path, rows: FileRows, group: list[Task], tasks: Sequence[Task], problems: Problems
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each task's labels (its "no label" for the rows it does not read) and which rows to keep
    (a bad label drops its row)."""
    keep = np.ones(len(rows.texts), bool)
    labels = {t.name: t.empty_labels(len(rows.texts)) for t in tasks}
    for col, t in enumerate(group):
        for r, raw in enumerate(rows.raw):
            if raw[col] == DROP:
                continue
            label = t.label_id(raw[col])
            if isinstance(label, str):  # the reason it is not a label
                problems.add(f"{path}:{rows.lines[r]}", Reason.UNKNOWN_LABEL, label)
                keep[r] = False
                continue
            labels[t.name][r] = label
    return labels, keep


def _split_indices(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified 80/10/10 split of ``range(len(labels))``; identical on every machine for a seed."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)  # (in place: the order rng.permutation(len(idx)) would give)
        n_val = int(round(len(idx) * SPLIT_FRACTIONS[1]))
        n_test = int(round(len(idx) * SPLIT_FRACTIONS[2]))
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    joined = [np.concatenate([np.zeros(0, np.int64)] + p) for p in parts]
    for p in joined:
        p.sort()
    return joined


def _split_off(
    splits: dict[str, Examples], tasks: Sequence[Task], sources: list[tuple], seed: int
) -> dict[str, Examples]:
    """Seeded stratified validation / test splits for tasks without their own files (``sources``:
    the (file, text) each example came from)."""
    for src_i, (spec, key) in enumerate(sources):
        owner = [t for t in tasks if t.config.train == spec and text_key(t) == key]
        if not owner:
            continue
        t0 = owner[0]
        if t0.config.validation and t0.config.test:
            continue
        in_train = np.flatnonzero(splits["train"].source == src_i)
        _, va, te = _split_indices(t0.strata(splits["train"].labels[t0.name][in_train]), seed)
        none = np.zeros(0, np.int64)
        moved = {"validation": none if t0.config.validation else va, "test": none if t0.config.test else te}
        stay = np.ones(len(in_train), bool)
        for local in moved.values():
            stay[local] = False
        rest = np.flatnonzero(splits["train"].source != src_i)
        for s, local in moved.items():
            if len(local):
                splits[s] = Examples.concat([splits[s], splits["train"].take(in_train[local])], tasks)
        splits["train"] = splits["train"].take(np.concatenate([rest, in_train[stay]]))
    return splits


def _check_train(train: Examples, tasks: Sequence[Task]) -> None:
    for t in tasks:
        y = train.labels[t.name]
        t.check_train(y[has_label(y)])


def text_key(task: Task) -> tuple:
    """What makes an example's text: tasks with the same key on one file share its rows."""
    return (task.text_kind, task.text_columns(), task.optional_columns())


def load_tasks(
    tasks: Sequence[TaskConfig], seed: int = 0, skip_bad_rows: bool = False, sink: Sink | None = None
) -> TaskData:
    """Read, validate and split every task's data. Raises :class:`BadRows` listing every bad row.

    Tasks that name the same file and text column share its rows (one example, a label per task);
    with different text columns each task has its own examples. With ``sink``, each chunk of texts
    goes to it as it is read, and the examples hold the units it returns instead of their texts.
    """
    if not tasks:
        raise MtlError("no tasks configured")
    kinds = [build(t) for t in tasks]  # label names not resolved yet
    files: dict[tuple, list[int]] = defaultdict(list)  # (split, file, text key) -> its tasks
    for ti, t in enumerate(tasks):
        for split in SPLITS:
            if getattr(t, split):
                files[(split, getattr(t, split), text_key(kinds[ti]))].append(ti)
    problems, notes = Problems(skip_bad_rows), []
    rows = {
        key: _read_task_file(resolve_path(key[1]), [kinds[ti] for ti in ids], problems, notes, sink)
        for key, ids in files.items()
    }
    objects = []
    for ti, t in enumerate(kinds):
        key = ("train", t.config.train, text_key(t))
        col = files[key].index(ti)
        objects.append(t.with_labels(r[col] for r in rows[key].raw if r[col] != DROP))
    sources: list[tuple] = []
    by_split: dict[str, list[Examples]] = {s: [] for s in SPLITS}
    empty: list[str] = []  # validation / test files with no example
    for (split, spec, key), task_ids in files.items():
        file_rows = rows[(split, spec, key)]
        group = [objects[ti] for ti in task_ids]
        labels, keep = _label_ids(resolve_path(spec), file_rows, group, objects, problems)
        sources.append((spec, key))
        source = np.full(len(file_rows.texts), len(sources) - 1, np.int32)
        examples = Examples(file_rows.texts, labels, source)
        by_split[split].append(examples if keep.all() else examples.take(np.flatnonzero(keep)))
        if split != "train" and not keep.any():
            empty.append(
                f"{resolve_path(spec)}: no examples (the {split} split of task(s) {', '.join(t.name for t in group)})"
            )
    del rows, file_rows  # (each file's line numbers and raw labels: not needed past here)
    if problems.listed:
        raise BadRows(problems.listed)
    if empty:  # (an empty training file: Task.check_train says which task has nothing to learn from)
        raise MtlError("\n".join(empty))
    notes += [f"skipped {n} bad rows: {reason}" for reason, n in sorted(problems.skipped.items())]
    splits = _split_off({s: Examples.concat(by_split[s], objects) for s in SPLITS}, objects, sources, seed)
    _check_train(splits["train"], objects)
    return TaskData(tuple(objects), splits, [spec for spec, _ in sources], notes)
