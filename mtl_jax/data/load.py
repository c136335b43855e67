"""Data: readers (csv / tsv / jsonl, optionally .gz / .bz2, and the embedded corpora),
validation with ``file:line: reason`` errors, label vocabularies and seeded stratified
splits. (Tokens, sampling and batches: ``mtl_jax.data.batching``.)

An example carries one label per task; ``-1`` means "no label for this task" (the
default case: each task has its own dataset). Tasks that read the same file share
its rows, so one example can carry labels for several tasks.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from mtl_jax.config import TaskConfig
from mtl_jax.data.assets import embedded_data_file
from mtl_jax.errors import MtlError
from mtl_jax.tasks import Task, build

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MAX_ERRORS_SHOWN = 20


@dataclass
class Row:
    line: int  # 1-based line where the record starts
    fields: dict[str, str | None]
    problem: str | None = None  # set when the record itself is malformed


def resolve_path(spec: str) -> Path:
    if spec.startswith("embedded:"):
        return embedded_data_file(spec[len("embedded:") :])
    return Path(spec).expanduser()


def _read_text(path: Path) -> str:
    """File contents as text; undecodable bytes become lone surrogates so the row can be named."""
    if not path.is_file():
        raise MtlError(f"{path}: file not found")
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except EOFError as e:  # gzip / bz2: the archive ends early
        raise MtlError(f"{path}: cannot read (truncated archive: {e})") from None
    except OSError as e:
        raise MtlError(f"{path}: cannot read ({e})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def _format(path: Path) -> str:
    name = path.name.lower()
    for ext in (".gz", ".bz2"):
        name = name.removesuffix(ext)
    for fmt in ("csv", "tsv", "jsonl"):
        if name.endswith("." + fmt):
            return fmt
    if name.endswith(".json") or name.endswith(".ndjson"):
        return "jsonl"
    raise MtlError(f"{path}: unknown format (use .csv, .tsv or .jsonl, optionally .gz/.bz2)")


def read_rows(path: Path, columns: Sequence[str]) -> list[Row]:
    """Every record of a csv / tsv / jsonl file, with the line it starts on.

    Missing columns are a file-level error; malformed records come back with ``problem`` set.
    """
    fmt = _format(path)
    text = _read_text(path)
    if fmt == "jsonl":
        return _jsonl_rows(path, text, columns)
    return _delimited_rows(path, text, columns, "\t" if fmt == "tsv" else ",")


def _json_field(value) -> str | None:
    """A JSON value as the text a column holds: a number as written in a CSV (``1.0`` is ``1``),
    NaN and null as a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _jsonl_rows(path: Path, text: str, columns: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append(Row(n, {}, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            rows.append(Row(n, {}, "expected a JSON object"))
            continue
        rows.append(Row(n, {c: _json_field(obj[c]) for c in columns if c in obj}))
    seen = set().union(*(r.fields.keys() for r in rows if r.problem is None)) if rows else set()
    missing = [c for c in columns if c not in seen]
    if rows and missing:
        raise MtlError(f"{path}: no field {', '.join(map(repr, missing))} in any record")
    return rows


def _delimited_rows(path: Path, text: str, columns: Sequence[str], delimiter: str) -> list[Row]:
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long text is data (the tokenizer truncates it)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise MtlError(f"{path}:1: malformed header ({e})") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise MtlError(f"{path}:1: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    index = {c: header.index(c) for c in columns}
    rows: list[Row] = []
    start = reader.line_num + 1
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(Row(start, {}, f"malformed record ({e})"))
            start = reader.line_num + 1
            continue
        if rec:
            if len(rec) != len(header):
                hint = " (an unterminated quote?)" if len(rec) < len(header) and "\n" in rec[-1] else ""
                rows.append(Row(start, {}, f"{len(rec)} fields, header has {len(header)}{hint}"))
            else:
                rows.append(Row(start, {c: rec[i] for c, i in index.items()}))
        start = reader.line_num + 1
    return rows


# ---------------------------------------------------------------------------- datasets


@dataclass
class Examples:
    """Texts with one label column per task (``-1``: no label) and the file each came from."""

    texts: list[str]
    labels: np.ndarray  # [N, T] int32
    source: np.ndarray  # [N] int32 index into TaskData.sources

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples([self.texts[i] for i in idx], self.labels[idx], self.source[idx])

    @staticmethod
    def concat(parts: Sequence[Examples], num_tasks: int) -> Examples:
        if not parts:
            return Examples([], np.zeros((0, num_tasks), np.int32), np.zeros((0,), np.int32))
        return Examples(
            [t for p in parts for t in p.texts],
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.source for p in parts]),
        )


@dataclass
class TaskData:
    """The three splits, the tasks (their label names resolved), and what was dropped."""

    tasks: tuple[Task, ...]
    splits: dict[str, Examples]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """Each task's label names."""
        return {t.name: t.labels for t in self.tasks}


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


DROP = "<drop>"  # a raw label of drop_labels: the row is left out for that task


@dataclass
class FileRows:
    """The good rows of one file, for the tasks that read it: text, raw label per task, line."""

    texts: list[str]
    raw: list[list[str]]  # [row][task of the group]: raw label, or DROP
    lines: list[int]


def _row_problem(
    row: Row, text_col: str, raw_labels: list[str | None], label_cols: list[str]
) -> tuple[Reason, str] | None:
    text = row.fields.get(text_col)
    if row.problem is not None:
        return Reason.MALFORMED, row.problem
    if text is None or not text.strip():
        return Reason.EMPTY_TEXT, "empty text"
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return Reason.INVALID_UTF8, "invalid UTF-8"
    if None in raw_labels:
        return Reason.MISSING_LABEL, f"missing label in column {label_cols[raw_labels.index(None)]!r}"
    return None


def _read_task_file(path: Path, group: list[Task], problems: Problems, notes: list[str]) -> FileRows:
    """The rows of one file that the tasks of ``group`` read (they share its text column)."""
    text_cols = {t.config.text_column for t in group}  # one: the tasks of a group share it
    (text_col,) = text_cols
    label_cols = [t.config.label_column for t in group]
    out = FileRows([], [], [])
    dropped: Counter = Counter()
    for row in read_rows(path, sorted(text_cols | {c for t in group for c in t.columns()})):
        raw_labels: list[str | None] = []
        for t in group:
            raw = row.fields.get(t.config.label_column)
            raw = None if raw is None or raw.strip().lower() in ("", "nan") else raw.strip()  # NaN: a missing label
            raw_labels.append(DROP if raw is not None and raw in t.config.drop_labels else raw)
        if row.problem is None and all(r == DROP for r in raw_labels):
            dropped[row.fields.get(label_cols[0])] += 1
            continue
        problem = _row_problem(row, text_col, raw_labels, label_cols)
        if problem is not None:
            problems.add(f"{path}:{row.line}", *problem)
            continue
        out.texts.append(row.fields[text_col])
        out.raw.append(raw_labels)
        out.lines.append(row.line)
    notes += [f"{path.name}: left out {n} rows labelled {value!r} (drop_labels)" for value, n in dropped.items()]
    return out


def _label_ids(
    path: Path, rows: FileRows, group: list[tuple[int, Task]], num_tasks: int, problems: Problems
) -> tuple[np.ndarray, np.ndarray]:
    """``[N, T]`` label ids (-1: none for that task) and which rows to keep (a bad label drops its row)."""
    keep = np.ones(len(rows.texts), bool)
    ids = np.full((len(rows.texts), num_tasks), -1, np.int32)
    for col, (ti, t) in enumerate(group):
        for r, raw in enumerate(rows.raw):
            if raw[col] == DROP:
                continue
            label = t.label_id(raw[col])
            if isinstance(label, str):  # the reason it is not a label
                problems.add(f"{path}:{rows.lines[r]}", Reason.UNKNOWN_LABEL, label)
                keep[r] = False
                continue
            ids[r, ti] = label
    return ids, keep


def _split_indices(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified 80/10/10 split of ``range(len(labels))``; identical on every machine for a seed."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * SPLIT_FRACTIONS[1]))
        n_test = int(round(len(idx) * SPLIT_FRACTIONS[2]))
        parts[1].extend(idx[:n_val])
        parts[2].extend(idx[n_val : n_val + n_test])
        parts[0].extend(idx[n_val + n_test :])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _split_off(
    splits: dict[str, Examples], tasks: Sequence[TaskConfig], sources: list[tuple[str, str]], seed: int
) -> dict[str, Examples]:
    """Seeded stratified validation / test splits for tasks without their own files (``sources``:
    the (file, text column) each example came from)."""
    T = len(tasks)
    for src_i, (spec, column) in enumerate(sources):
        owner = [ti for ti, t in enumerate(tasks) if t.train == spec and t.text_column == column]
        if not owner:
            continue
        t0 = tasks[owner[0]]
        if t0.validation and t0.test:
            continue
        in_train = np.flatnonzero(splits["train"].source == src_i)
        strat = splits["train"].labels[in_train, owner[0]]
        _, va, te = _split_indices(strat, seed)
        none = np.zeros(0, np.int64)
        moved = {"validation": none if t0.validation else va, "test": none if t0.test else te}
        stay = np.setdiff1d(np.arange(len(in_train)), np.concatenate(list(moved.values())))
        rest = np.setdiff1d(np.arange(len(splits["train"])), in_train)
        for s, local in moved.items():
            if len(local):
                splits[s] = Examples.concat([splits[s], splits["train"].take(in_train[local])], T)
        splits["train"] = Examples.concat([splits["train"].take(rest), splits["train"].take(in_train[stay])], T)
    return splits


def _check_train(train: Examples, tasks: Sequence[Task]) -> None:
    for ti, t in enumerate(tasks):
        y = train.labels[:, ti]
        t.check_train(y[y >= 0])


def load_tasks(tasks: Sequence[TaskConfig], seed: int = 0, skip_bad_rows: bool = False) -> TaskData:
    """Read, validate and split every task's data. Raises :class:`BadRows` listing every bad row.

    Tasks that name the same file and text column share its rows (one example, a label per task);
    with different text columns each task has its own examples.
    """
    if not tasks:
        raise MtlError("no tasks configured")
    files: dict[tuple[str, str, str], list[int]] = defaultdict(list)  # (split, file, text column) -> its tasks
    for ti, t in enumerate(tasks):
        for split in SPLITS:
            if getattr(t, split):
                files[(split, getattr(t, split), t.text_column)].append(ti)
    problems, notes = Problems(skip_bad_rows), []
    kinds = [build(t) for t in tasks]  # label names not resolved yet
    rows = {
        key: _read_task_file(resolve_path(key[1]), [kinds[ti] for ti in ids], problems, notes)
        for key, ids in files.items()
    }
    objects = [
        kinds[ti].with_labels(r[col] for r in rows[("train", t.train, t.text_column)].raw if r[col] != DROP)
        for ti, t in enumerate(tasks)
        for col in [files[("train", t.train, t.text_column)].index(ti)]
    ]
    sources: list[tuple[str, str]] = []
    by_split: dict[str, list[Examples]] = {s: [] for s in SPLITS}
    for (split, spec, column), task_ids in files.items():
        file_rows = rows[(split, spec, column)]
        ids, keep = _label_ids(
            resolve_path(spec), file_rows, [(ti, objects[ti]) for ti in task_ids], len(tasks), problems
        )
        sources.append((spec, column))
        source = np.full(len(file_rows.texts), len(sources) - 1, np.int32)
        by_split[split].append(Examples(list(file_rows.texts), ids, source).take(np.flatnonzero(keep)))
    if problems.listed:
        raise BadRows(problems.listed)
    notes += [f"skipped {n} bad rows: {reason}" for reason, n in sorted(problems.skipped.items())]
    splits = _split_off({s: Examples.concat(by_split[s], len(tasks)) for s in SPLITS}, tasks, sources, seed)
    _check_train(splits["train"], objects)
    return TaskData(tuple(objects), splits, [spec for spec, _ in sources], notes)
