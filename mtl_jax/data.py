"""Data: readers (csv / tsv / jsonl, optionally .gz / .bz2, and the embedded corpora),
validation with ``file:line: reason`` errors, label vocabularies, seeded stratified
splits, tokenization, task sampling and length-bucketed batches.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mtl_jax.assets import embedded_data_file
from mtl_jax.config import TaskConfig
from mtl_jax.errors import MtlError
from mtl_jax.text import TextTokenizer, bucket_for, bucket_lengths, pad_batch

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
    rows: list[Row] = []
    if fmt == "jsonl":
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
            rows.append(Row(n, {c: None if obj.get(c) is None else str(obj[c]) for c in columns if c in obj}))
        seen = set().union(*(r.fields.keys() for r in rows if r.problem is None)) if rows else set()
        missing = [c for c in columns if c not in seen]
        if rows and missing:
            raise MtlError(f"{path}: no field {', '.join(map(repr, missing))} in any record")
        return rows
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
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
                rows.append(Row(start, {}, f"{len(rec)} fields, header has {len(header)}"))
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

    def take(self, idx: np.ndarray) -> "Examples":
        return Examples([self.texts[i] for i in idx], self.labels[idx], self.source[idx])

    @staticmethod
    def concat(parts: Sequence["Examples"], num_tasks: int) -> "Examples":
        if not parts:
            return Examples([], np.zeros((0, num_tasks), np.int32), np.zeros((0,), np.int32))
        return Examples(
            [t for p in parts for t in p.texts],
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.source for p in parts]),
        )


@dataclass
class TaskData:
    """The three splits, the task names and their label vocabularies, and what was dropped."""

    tasks: tuple[TaskConfig, ...]
    labels: dict[str, tuple[str, ...]]
    splits: dict[str, Examples]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


class BadRows(MtlError):
    """Bad input rows: the message lists ``file:line: reason`` for each (up to a limit)."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_ERRORS_SHOWN]
        more = len(problems) - len(shown)
        tail = [f"... and {more} more bad rows"] if more else []
        super().__init__("\n".join(shown + tail + [f"{len(problems)} bad rows; fix them or pass --skip-bad-rows"]))
        self.problems = problems


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


def load_tasks(tasks: Sequence[TaskConfig], seed: int = 0, skip_bad_rows: bool = False) -> TaskData:
    """Read, validate and split every task's data. Raises :class:`BadRows` listing every bad row."""
    if not tasks:
        raise MtlError("no tasks configured")
    names = [t.name for t in tasks]
    T = len(tasks)
    # One group of tasks per distinct file: tasks naming the same file share its rows.
    files: dict[tuple[str, str], list[int]] = defaultdict(list)
    for ti, t in enumerate(tasks):
        for split in SPLITS:
            spec = getattr(t, split)
            if spec:
                files[(split, spec)].append(ti)
    problems: list[str] = []
    skipped: Counter = Counter()
    notes: list[str] = []
    per_file: dict[tuple[str, str], tuple[list[str], list[list[str | None]], list[int]]] = {}
    for (split, spec), task_ids in files.items():
        path = resolve_path(spec)
        columns = sorted({c for ti in task_ids for c in (tasks[ti].text_column, tasks[ti].label_column)})
        text_cols = {tasks[ti].text_column for ti in task_ids}
        if len(text_cols) > 1:
            raise MtlError(f"{path}: tasks {', '.join(names[ti] for ti in task_ids)} read it with different text columns")
        text_col = text_cols.pop()
        texts: list[str] = []
        raw_rows: list[list[str | None]] = []  # raw label per task of the group; "<drop>": left out
        lines: list[int] = []
        dropped: Counter = Counter()
        for row in read_rows(path, columns):
            where = f"{path}:{row.line}"
            reason = row.problem
            raw_labels: list[str | None] = []
            for ti in task_ids:
                raw = row.fields.get(tasks[ti].label_column)
                raw = None if raw is None or not raw.strip() else raw.strip()
                raw_labels.append("<drop>" if raw is not None and raw in tasks[ti].drop_labels else raw)
            if reason is None and all(r == "<drop>" for r in raw_labels):
                dropped[row.fields.get(tasks[task_ids[0]].label_column)] += 1
                continue
            text = row.fields.get(text_col)
            if reason is None and (text is None or not text.strip()):
                reason = "empty text"
            if reason is None and any("\udc80" <= ch <= "\udcff" for ch in text):
                reason = "invalid UTF-8"
            if reason is None and None in raw_labels:
                reason = f"missing label in column {tasks[task_ids[raw_labels.index(None)]].label_column!r}"
            if reason is not None:
                if skip_bad_rows:
                    skipped[reason.split(" (")[0].split(" in column")[0]] += 1
                else:
                    problems.append(f"{where}: {reason}")
                continue
            texts.append(text)
            raw_rows.append(raw_labels)
            lines.append(row.line)
        for value, n in dropped.items():
            notes.append(f"{path.name}: left out {n} rows labelled {value!r} (drop_labels)")
        per_file[(split, spec)] = (texts, raw_rows, lines)
    # Label vocabularies: explicit, else sorted values seen in training data.
    vocab: dict[str, tuple[str, ...]] = {}
    for ti, t in enumerate(tasks):
        mapped = lambda raw, t=t: (t.label_map or {}).get(raw, raw)  # noqa: E731
        if t.labels:
            vocab[t.name] = tuple(t.labels)
        else:
            _, raw, _ = per_file[("train", t.train)]
            col = files[("train", t.train)].index(ti)
            vocab[t.name] = tuple(sorted({mapped(r[col]) for r in raw if r[col] != "<drop>"}))
    # Map raw labels to ids, checking explicit vocabularies.
    sources: list[str] = []
    by_split: dict[str, list[Examples]] = {s: [] for s in SPLITS}
    for (split, spec), task_ids in files.items():
        texts, raw, lines = per_file[(split, spec)]
        path = resolve_path(spec)
        keep = np.ones(len(texts), bool)
        ids = np.full((len(texts), T), -1, np.int32)
        for col, ti in enumerate(task_ids):
            t = tasks[ti]
            index = {name: i for i, name in enumerate(vocab[t.name])}
            for r, row in enumerate(raw):
                value = row[col]
                if value == "<drop>":
                    continue
                label = (t.label_map or {}).get(value, value)
                if label not in index:
                    reason = f"label {value!r} not in the labels of task {t.name} ({', '.join(vocab[t.name])})"
                    if skip_bad_rows:
                        skipped["label not in labels"] += 1
                        keep[r] = False
                    else:
                        problems.append(f"{path}:{lines[r]}: {reason}")
                    continue
                ids[r, ti] = index[label]
        sources.append(spec)
        ex = Examples(list(texts), ids, np.full(len(texts), len(sources) - 1, np.int32)).take(np.flatnonzero(keep))
        by_split[split].append(ex)
    if problems:
        raise BadRows(problems)
    for reason, n in sorted(skipped.items()):
        notes.append(f"skipped {n} bad rows: {reason}")
    # Seeded stratified splits for tasks without their own validation / test files.
    splits = {s: Examples.concat(by_split[s], T) for s in SPLITS}
    for src_i, spec in enumerate(sources):
        owner = [ti for ti, t in enumerate(tasks) if t.train == spec]
        if not owner:
            continue
        t0 = tasks[owner[0]]
        if t0.validation and t0.test:
            continue
        in_train = np.flatnonzero(splits["train"].source == src_i)
        strat = splits["train"].labels[in_train, owner[0]]
        tr, va, te = _split_indices(strat, seed)
        moved = {"validation": va if not t0.validation else np.zeros(0, np.int64), "test": te if not t0.test else np.zeros(0, np.int64)}
        stay = np.setdiff1d(np.arange(len(in_train)), np.concatenate(list(moved.values())))
        rest = np.setdiff1d(np.arange(len(splits["train"])), in_train)
        for s, local in moved.items():
            if len(local):
                splits[s] = Examples.concat([splits[s], splits["train"].take(in_train[local])], T)
        splits["train"] = Examples.concat([splits["train"].take(rest), splits["train"].take(in_train[stay])], T)
    for ti, t in enumerate(tasks):
        counts = np.bincount(splits["train"].labels[:, ti][splits["train"].labels[:, ti] >= 0], minlength=len(vocab[t.name]))
        if counts.sum() == 0:
            raise MtlError(f"{t.train}: task {t.name} has no training examples")
        if (counts > 0).sum() < 2:
            raise MtlError(f"{t.train}: task {t.name} needs at least two classes in its training data, found {(counts > 0).sum()}")
    return TaskData(tuple(tasks), vocab, splits, sources, notes)


# ---------------------------------------------------------------------------- tokens and batches


@dataclass
class Tokenized:
    ids: list[np.ndarray]
    labels: np.ndarray  # [N, T]
    source: np.ndarray  # [N]
    truncated: int
    embeddings: np.ndarray | None = None  # [N, D] cached pooled embeddings of a frozen encoder

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.ids), np.int64, len(self.ids))


def tokenize(examples: Examples, tokenizer: TextTokenizer, max_length: int) -> Tokenized:
    ids, truncated = tokenizer(examples.texts, max_length)
    return Tokenized(ids, examples.labels, examples.source, int(truncated.sum()))


def sampling_counts(sizes: Sequence[int], method: str, temperature: float = 2.0) -> np.ndarray:
    """Examples drawn per source in one epoch (the epoch has ``sum(sizes)`` examples).

    ``proportional``: every example once; ``uniform``: the same number per source;
    ``temperature``: p proportional to n^(1/T).
    """
    n = np.asarray(sizes, np.float64)
    if method == "proportional":
        return n.astype(np.int64)
    if method == "uniform":
        p = np.ones_like(n)
    elif method == "temperature":
        p = n ** (1.0 / temperature)
    else:
        raise MtlError(f"unknown sampling {method!r} (proportional, uniform, temperature)")
    p = p / p.sum()
    counts = np.floor(p * n.sum()).astype(np.int64)
    counts[np.argmax(p)] += int(n.sum() - counts.sum())
    return counts


@dataclass
class Batch:
    input_ids: np.ndarray | None  # [B, L] int32 (None when the batch holds cached embeddings)
    attention_mask: np.ndarray | None  # [B, L] int32
    labels: np.ndarray  # [B, T] int32, -1 where absent (and for padding rows)
    index: np.ndarray  # [n] example indices of the real rows (n <= B)
    embeddings: np.ndarray | None = None  # [B, D] float32

    def arrays(self) -> dict[str, np.ndarray]:
        if self.embeddings is not None:
            return {"embeddings": self.embeddings, "labels": self.labels}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def make_batch(data: Tokenized, idx: np.ndarray, rows: int, buckets: Sequence[int], pad_id: int,
               length: int | None = None) -> Batch:
    """Rows ``idx`` padded to ``rows`` and to a bucket length (or ``length``); cached embeddings when ``data`` has them."""
    labels = np.full((rows, data.labels.shape[1]), -1, np.int32)
    labels[: len(idx)] = data.labels[idx]
    if data.embeddings is not None:
        emb = np.zeros((rows, data.embeddings.shape[1]), np.float32)
        emb[: len(idx)] = data.embeddings[idx]
        return Batch(None, None, labels, np.asarray(idx), emb)
    length = length or bucket_for(max(len(data.ids[i]) for i in idx), buckets)
    ids, mask = pad_batch([data.ids[i] for i in idx], length, rows, pad_id)
    return Batch(ids, mask, labels, np.asarray(idx))


def make_task_batch(data: Tokenized, idxs: Sequence[np.ndarray], rows: int, buckets: Sequence[int],
                    pad_id: int) -> dict[str, np.ndarray]:
    """A task-stacked batch: arrays ``[rows, T, ...]``, sub-batch ``t`` = task ``t``'s rows ``idxs[t]``.

    Every sub-batch is padded to the same bucket length (the longest of them).
    """
    length = None
    if data.embeddings is None:
        length = bucket_for(max(len(data.ids[i]) for idx in idxs for i in idx), buckets)
    parts = [make_batch(data, idx, rows, buckets, pad_id, length).arrays() for idx in idxs]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


def task_members(data: Tokenized) -> list[np.ndarray]:
    """Per task, the examples that carry its label."""
    return [np.flatnonzero(data.labels[:, t] >= 0) for t in range(data.labels.shape[1])]


def task_plan(data: Tokenized, batch_size: int, seed: int, epoch: int, sort_window: int = 64) -> list[list[np.ndarray]]:
    """Steps for ``--loss-weighting pcgrad``: each holds ``batch_size // T`` examples of every task.

    An epoch has as many examples as the other plans (``len(data)``); each task cycles
    through its own shuffled examples (so every task weighs the same, whatever its size).
    Per task, examples are length-sorted inside windows; the k-th shortest sub-batches
    of all tasks form one step (similar lengths pad little), then the steps are shuffled.
    """
    members = task_members(data)
    rows = batch_size // len(members)
    if rows < 1:
        raise MtlError(f"--batch-size {batch_size} is smaller than the number of tasks ({len(members)})")
    rng = np.random.default_rng([seed, epoch, 7])
    steps = max(1, math.ceil(len(data) / (rows * len(members))))
    lengths = data.lengths
    per_task = []
    for m in members:
        subs = _length_sorted_batches(_draw(m, steps * rows, rng), lengths, rows, sort_window)
        subs.sort(key=lambda idx: int(lengths[idx].max()))
        per_task.append(subs)
    plan = [list(step) for step in zip(*per_task)]
    return [plan[i] for i in rng.permutation(len(plan))]


def probe_indices(data: Tokenized, batch_size: int, seed: int) -> list[np.ndarray]:
    """A fixed sample of ``batch_size // T`` examples per task for the task-gradient diagnostics."""
    members = task_members(data)
    rng = np.random.default_rng([seed, 11])
    rows = max(1, batch_size // len(members))
    return [np.sort(rng.choice(m, min(rows, len(m)), replace=False)) for m in members]


def epoch_plan(data: Tokenized, batch_size: int, seed: int, epoch: int, sampling: str = "proportional",
               temperature: float = 2.0, sort_window: int = 64) -> list[np.ndarray]:
    """The example indices of every batch of one epoch, a pure function of (seed, epoch).

    Sources are sampled per ``sampling``. Each batch holds examples of one source (one
    task's file), so a small task's few examples are not up-weighted by sharing a batch,
    and thus a per-task mean, with a large one. Inside a source the drawn examples are
    shuffled, sorted by length inside windows of ``sort_window`` batches (a batch holds
    similar lengths and pads little); then all batches are shuffled together.
    """
    rng = np.random.default_rng([seed, epoch])
    sizes = np.bincount(data.source, minlength=int(data.source.max()) + 1 if len(data) else 0)
    counts = sampling_counts(sizes, sampling, temperature)
    lengths = data.lengths
    batches = []
    for src, (n, k) in enumerate(zip(sizes, counts)):
        if n == 0 or k == 0:
            continue
        order = _draw(np.flatnonzero(data.source == src), k, rng)
        batches += _length_sorted_batches(order, lengths, batch_size, sort_window)
    return [batches[i] for i in rng.permutation(len(batches))]


def _draw(members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``members``: shuffled passes over all of them, as many as needed, cut at ``k``."""
    reps = [members[rng.permutation(len(members))] for _ in range(math.ceil(k / len(members)))]
    return np.concatenate(reps)[:k]


def _length_sorted_batches(order: np.ndarray, lengths: np.ndarray, rows: int, sort_window: int) -> list[np.ndarray]:
    """Batches of ``rows`` from ``order``, sorted by length inside windows of ``sort_window`` batches."""
    batches = []
    window = rows * sort_window
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + rows] for i in range(0, len(chunk), rows))
    return batches


def eval_batches(data: Tokenized, batch_size: int, max_length: int, pad_id: int) -> Iterator[Batch]:
    """Every example exactly once, length-sorted; the last batch is padded with unlabeled rows."""
    order = np.argsort(data.lengths, kind="stable")
    buckets = bucket_lengths(max_length)
    for start in range(0, len(order), batch_size):
        yield make_batch(data, order[start : start + batch_size], batch_size, buckets, pad_id)
