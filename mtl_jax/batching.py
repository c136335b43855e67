"""From tokenized examples to device batches: task sampling, epoch plans, padded batches,
and :class:`InputPipeline`, which holds what every batch needs (the tokenized splits,
pad id, length buckets, batch sizes, the device mesh).

An epoch plan is a pure function of (seed, epoch), so a resumed run continues at the same
batch, and every process of a multi-process run plans the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mtl_jax.data import Examples
from mtl_jax.errors import MtlError
from mtl_jax.text import TextTokenizer, bucket_for, bucket_lengths, pad_batch


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


def make_batch(
    data: Tokenized, idx: np.ndarray, rows: int, buckets: Sequence[int], pad_id: int, length: int | None = None
) -> Batch:
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


def make_task_batch(
    data: Tokenized, idxs: Sequence[np.ndarray], rows: int, buckets: Sequence[int], pad_id: int
) -> dict[str, np.ndarray]:
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


def epoch_plan(
    data: Tokenized,
    batch_size: int,
    seed: int,
    epoch: int,
    sampling: str = "proportional",
    temperature: float = 2.0,
    sort_window: int = 64,
) -> list[np.ndarray]:
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


@dataclass
class InputPipeline:
    """What every batch of a run needs, in one place: the tokenized splits, the pad id, the length
    buckets, the batch sizes, the sampling, and the device mesh batches are split over.

    ``plan(epoch)`` gives an epoch's batches (example indices), ``train_batch`` one step's
    arrays on the devices, ``eval_batches`` every example of a split once.
    """

    splits: dict[str, Tokenized]
    pad_id: int
    max_length: int
    batch_size: int
    eval_batch_size: int
    seed: int
    sampling: str = "proportional"
    temperature: float = 2.0
    task_stacked: bool = False  # every step holds every task (pcgrad): arrays [rows, T, ...]
    mesh: object = None  # jax.sharding.Mesh; None: arrays stay on the host

    @property
    def buckets(self) -> tuple[int, ...]:
        return bucket_lengths(self.max_length)

    @property
    def train(self) -> Tokenized:
        return self.splits["train"]

    @property
    def num_tasks(self) -> int:
        return self.train.labels.shape[1]

    def plan(self, epoch: int) -> list:
        """The batches of one epoch: example indices per step (per task and step when task-stacked)."""
        if self.task_stacked:
            return task_plan(self.train, self.batch_size, self.seed, epoch)
        return epoch_plan(self.train, self.batch_size, self.seed, epoch, self.sampling, self.temperature)

    def examples_in(self, idx) -> int:
        return sum(len(i) for i in idx) if self.task_stacked else len(idx)

    def train_batch(self, idx, data: Tokenized | None = None) -> dict:
        """One step's arrays (of ``data``, default the training split, e.g. with cached embeddings)."""
        data = self.train if data is None else data
        if self.task_stacked:
            arrays = make_task_batch(data, idx, self.batch_size // self.num_tasks, self.buckets, self.pad_id)
        else:
            arrays = make_batch(data, idx, self.batch_size, self.buckets, self.pad_id).arrays()
        return self._place(arrays)

    def probe_batch(self) -> dict:
        """The fixed task-stacked batch of the task-gradient diagnostics."""
        rows = max(1, self.batch_size // self.num_tasks)
        idx = probe_indices(self.train, self.batch_size, self.seed)
        return self._place(make_task_batch(self.train, idx, rows, self.buckets, self.pad_id))

    def eval_batches(self, data: Tokenized) -> Iterator[tuple[np.ndarray, dict]]:
        """``(example indices, arrays)`` covering every example of ``data`` once, length-sorted."""
        for batch in eval_batches(data, self.eval_batch_size, self.max_length, self.pad_id):
            yield batch.index, self._place(batch.arrays())

    def _place(self, arrays: dict) -> dict:
        if self.mesh is None:
            return arrays
        from mtl_jax.parallel import shard_batch

        return shard_batch(arrays, self.mesh)
