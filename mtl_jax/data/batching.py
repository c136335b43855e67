"""From tokenized examples to device batches: task sampling, epoch plans, packed batches,
and :class:`InputPipeline`, which holds what every batch needs (the tokenized splits,
pad id, batch sizes, the grids, the device mesh).

An epoch plan is a pure function of (seed, epoch), so a resumed run continues at the same
batch, and every process of a multi-process run plans the same global batch.

A training step's examples are packed several to a row (``mtl_jax.data.packing``) into a fixed
grid ``[rows, length]``: ``length`` is one of two row lengths (``packing.row_lengths``: the
short one unless the step holds a longer example) and ``rows`` the most any planned step of
the run needs at that length, so a phase compiles two step shapes at most. A packed batch
is ``ids``, ``positions``, ``segments`` ``[R, P]`` and ``labels`` ``[R, S, T]`` (slot ``s`` of
row ``r``: the row's ``s``-th sentence; ``-1`` where a slot is empty or the task unlabelled).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import flax
import jax
import numpy as np

from mtl_jax.data.load import Examples
from mtl_jax.data.packing import (
    MAX_SEGMENTS,
    PackedCall,
    bucket_for,
    fill_rows,
    pack_rows,
    packed_calls,
    round_up,
    row_lengths,
)
from mtl_jax.data.text import TextTokenizer
from mtl_jax.errors import MtlError


@flax.struct.dataclass
class TokenBatch:
    """Packed rows of tokens (see :mod:`mtl_jax.data.packing`) and their slots' labels. Task-stacked
    (every task in each step): each array has a task axis after the rows (``[R, T, ...]``)."""

    ids: np.ndarray  # [R, P] int32 token ids
    positions: np.ndarray  # [R, P] each token's position in its own sentence
    segments: np.ndarray  # [R, P] the sentence (1..S) a token belongs to; 0: padding
    labels: np.ndarray  # [R, S, T] slot s of row r: its sentence's label per task (-1: none)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape that a compiled step is specialised to."""
        return tuple(self.ids.shape)

    def logits(self, model, variables, deterministic: bool, encoder_deterministic: bool, rngs) -> dict:
        """``{task: [R * S, C]}``: every slot through the encoder and the heads."""
        num_segments = self.labels.shape[-2]
        return model.apply(
            variables, self.ids, self.positions, self.segments, num_segments, deterministic=deterministic,
            encoder_deterministic=encoder_deterministic, rngs=rngs, method="classify_packed",
        )  # fmt: skip


@flax.struct.dataclass
class EmbeddingBatch:
    """Cached pooled embeddings of a frozen encoder, one per slot, and their labels."""

    embeddings: np.ndarray  # [R * S, D] float32 (zeros in an empty slot)
    labels: np.ndarray  # [R * S, T]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.embeddings.shape)

    def logits(self, model, variables, deterministic: bool, encoder_deterministic: bool, rngs) -> dict:
        """``{task: [R * S, C]}``: the heads alone."""
        return model.apply(variables, self.embeddings, deterministic=deterministic, rngs=rngs, method="classify")


Batch = TokenBatch | EmbeddingBatch


@dataclass
class Tokenized:
    ids: list[np.ndarray]
    labels: np.ndarray  # [N, T]
    source: np.ndarray  # [N]
    truncated: int
    embeddings: np.ndarray | None = None  # [N, D] cached pooled embeddings of a frozen encoder

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
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


@dataclass(frozen=True)
class Grid:
    """A packed batch's shape: ``rows`` rows of ``length`` tokens."""

    rows: int
    length: int


def pack_examples(data: Tokenized, idx: np.ndarray, grid: Grid, pad_id: int) -> tuple[Batch, np.ndarray]:
    """Examples ``idx`` packed into ``grid``: ``(batch, example index per slot [R * S], -1 = empty)``.

    With cached embeddings an :class:`EmbeddingBatch`: each example's embedding in the slot its
    tokens would have, so the heads see the same rows (and dropout masks) as in a forward pass
    through the encoder.
    """
    idx = np.asarray(idx)
    rows = pack_rows(data.lengths[idx], (grid.length,))
    if len(rows) > grid.rows:
        raise ValueError(f"{len(idx)} examples need {len(rows)} rows of {grid.length} tokens; the grid has {grid.rows}")
    call = fill_rows([data.ids[i] for i in idx], [members for _, members in rows], (grid.rows, grid.length), pad_id)
    slot = np.where(call.index >= 0, idx[np.maximum(call.index, 0)], -1)
    labels = slot_labels(data, slot)
    if data.embeddings is not None:
        emb = np.where(slot[:, None] >= 0, data.embeddings[np.maximum(slot, 0)], 0.0).astype(np.float32)
        return EmbeddingBatch(emb, labels), slot
    return call_arrays(call, labels), slot


def call_arrays(call: PackedCall, labels: np.ndarray) -> TokenBatch:
    """A packed call as a step's batch, with its slots' ``labels`` ``[R * S, T]`` as ``[R, S, T]``."""
    return TokenBatch(call.ids, call.positions, call.segments, labels.reshape(call.ids.shape[0], MAX_SEGMENTS, -1))


def slot_labels(data: Tokenized, slot: np.ndarray) -> np.ndarray:
    """``[len(slot), T]`` int32: the labels of the examples in ``slot`` (-1 for an empty slot)."""
    return np.where(slot[:, None] >= 0, data.labels[np.maximum(slot, 0)], -1).astype(np.int32)


def embedding_batch(data: Tokenized, idx: np.ndarray, rows: int) -> tuple[EmbeddingBatch, np.ndarray]:
    """Cached embeddings of examples ``idx`` for evaluation, padded to ``rows``: ``(batch, example
    index per row, -1 = padding)``."""
    slot = np.full(rows, -1, np.int64)
    slot[: len(idx)] = idx
    emb = np.zeros((rows, data.embeddings.shape[1]), np.float32)
    emb[: len(idx)] = data.embeddings[idx]
    return EmbeddingBatch(emb, slot_labels(data, slot)), slot


def single_rows(ids: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> TokenBatch:
    """A padded batch (one sentence per row, ``ids``/``mask`` ``[B, L]``, ``labels`` ``[B, T]``) as a packed one."""
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return TokenBatch(ids, positions, mask, labels[:, None])


def step_length(data: Tokenized, parts: Sequence[np.ndarray]) -> int:
    """The row length of a step holding ``parts``: the shortest of the training row lengths that fits."""
    longest = max(int(data.lengths[p].max()) for p in parts if len(p))
    return bucket_for(longest, row_lengths(int(data.lengths.max())))


def plan_grids(data: Tokenized, plans: Iterator[list], task_stacked: bool, row_multiple: int = 1) -> dict[int, Grid]:
    """``{row length: Grid}`` holding every step of ``plans``, rows rounded up to ``row_multiple``."""
    lengths = data.lengths
    need: dict[int, int] = {}
    for plan in plans:
        for step in plan:
            parts = step if task_stacked else [step]
            length = step_length(data, parts)
            rows = max(len(pack_rows(lengths[p], (length,))) for p in parts)
            need[length] = max(need.get(length, 0), rows)
    return {n: Grid(round_up(r, row_multiple), n) for n, r in need.items()}


def task_members(data: Tokenized) -> list[np.ndarray]:
    """Per task, the examples that carry its label."""
    return [np.flatnonzero(data.labels[:, t] >= 0) for t in range(data.labels.shape[1])]


def task_plan(data: Tokenized, batch_size: int, seed: int, epoch: int, window: int = 64) -> list[list[np.ndarray]]:
    """Steps that hold every task (weighting methods with ``every_task``): each holds ``batch_size // T``
    examples of every task.

    An epoch has as many examples as the other plans (``len(data)``); each task cycles
    through its own shuffled examples (so every task weighs the same, whatever its size).
    Per task, sub-batches are balanced inside windows (``_balanced_batches``); the k-th
    shortest sub-batches of all tasks form one step (those holding long examples go
    together, so few steps need the long rows), then the steps are shuffled.
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
        subs = _balanced_batches(_draw(m, steps * rows, rng), lengths, rows, window)
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
    window: int = 64,
) -> list[np.ndarray]:
    """The example indices of every batch of one epoch, a pure function of (seed, epoch).

    Sources are sampled per ``sampling``. Each batch holds examples of one source (one
    task's file), so a small task's few examples are not up-weighted by sharing a batch,
    and thus a per-task mean, with a large one. Inside a source the drawn examples are
    shuffled and dealt into batches of nearly equal token counts inside windows of
    ``window`` batches (``_balanced_batches``: every step fits a small packed grid); then
    all batches are shuffled together.
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
        batches += _balanced_batches(order, lengths, batch_size, window)
    return [batches[i] for i in rng.permutation(len(batches))]


def _draw(members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``members``: shuffled passes over all of them, as many as needed, cut at ``k``."""
    reps = [members[rng.permutation(len(members))] for _ in range(math.ceil(k / len(members)))]
    return np.concatenate(reps)[:k]


def _balanced_batches(order: np.ndarray, lengths: np.ndarray, rows: int, window: int) -> list[np.ndarray]:
    """Batches of about ``rows`` from ``order`` whose token counts are nearly equal (so every step
    fits a small packed grid), inside windows of ``window`` batches.

    In a window, the examples longer than the short row length (``packing.row_lengths``) go
    into batches of their own (topped up with the next longest), which then pack into the long
    rows; each group is dealt longest first in snake order (batch 1, 2, ..., n, n, ..., 1, ...).
    """
    short = row_lengths(int(lengths.max()) if len(lengths) else 1)[0]
    batches = []
    for start in range(0, len(order), rows * window):
        chunk = order[start : start + rows * window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        head = math.ceil(int((lengths[chunk] > short).sum()) / rows) * rows
        for group in (chunk[:head], chunk[head:]):
            n = math.ceil(len(group) / rows)
            k = np.arange(len(group))
            turn, place = np.divmod(k, n) if n else (k, k)
            batch_of = np.where(turn % 2 == 1, n - 1 - place, place)
            batches.extend(group[batch_of == b] for b in range(n))
    return batches


def _stack(built: list[Batch], task_stacked: bool) -> Batch:
    """One step's batch from its parts; task-stacked: part ``t`` at ``[:, t]``."""
    if not task_stacked:
        return built[0]
    return jax.tree.map(lambda *parts: np.stack(parts, axis=1), *built)


@dataclass
class InputPipeline:
    """What every batch of a run needs, in one place: the tokenized splits, the pad id, the
    batch sizes, the sampling, the epochs the grids are sized for, and the device mesh
    batches are split over.

    ``plan(epoch)`` gives an epoch's batches (example indices), ``train_batch`` one step's
    packed arrays on the devices, ``eval_batches`` every example of a split once.
    """

    splits: dict[str, Tokenized]
    pad_id: int
    max_length: int
    batch_size: int
    eval_batch_size: int
    seed: int
    epochs: int = 1  # the grids hold every step of epochs 0 .. epochs - 1
    sampling: str = "proportional"
    temperature: float = 2.0
    task_stacked: bool = False  # every step holds every task (pcgrad): arrays [rows, T, ...]
    grad_accum: int = 1  # training rows come in multiples of devices x micro-batches
    mesh: object = None  # jax.sharding.Mesh; None: arrays stay on the host

    @property
    def train(self) -> Tokenized:
        return self.splits["train"]

    @property
    def num_tasks(self) -> int:
        return self.train.labels.shape[1]

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    @functools.cached_property
    def grids(self) -> dict[int, Grid]:
        """``{row length: Grid}``: the (at most two) training step shapes of the whole run."""
        plans = (self.plan(epoch) for epoch in range(self.epochs))
        return plan_grids(self.train, plans, self.task_stacked, self.devices * self.grad_accum)

    def plan(self, epoch: int) -> list:
        """The batches of one epoch: example indices per step (per task and step when task-stacked)."""
        if self.task_stacked:
            return task_plan(self.train, self.batch_size, self.seed, epoch)
        return epoch_plan(self.train, self.batch_size, self.seed, epoch, self.sampling, self.temperature)

    def examples_in(self, idx) -> int:
        return sum(len(i) for i in idx) if self.task_stacked else len(idx)

    def train_batch(self, idx, data: Tokenized | None = None) -> Batch:
        """One step's arrays (of ``data``, default the training split, e.g. with cached embeddings)."""
        data = self.train if data is None else data
        parts = idx if self.task_stacked else [idx]
        grid = self.grids[step_length(data, parts)]
        built = [pack_examples(data, p, grid, self.pad_id)[0] for p in parts]
        return self._place(_stack(built, self.task_stacked))

    def probe_batch(self) -> TokenBatch:
        """The fixed task-stacked batch of the task-gradient diagnostics (its own grid)."""
        parts = probe_indices(self.train, self.batch_size, self.seed)
        (grid,) = plan_grids(self.train, [[parts]], task_stacked=True, row_multiple=self.devices).values()
        return self._place(_stack([pack_examples(self.train, p, grid, self.pad_id)[0] for p in parts], True))

    def eval_batches(self, data: Tokenized) -> Iterator[tuple[np.ndarray, Batch]]:
        """``(example index per slot, -1 = empty; batch)`` covering every example of ``data`` once."""
        if data.embeddings is not None:
            for start in range(0, len(data), self.eval_batch_size):
                idx = np.arange(start, min(start + self.eval_batch_size, len(data)))
                arrays, slot = embedding_batch(data, idx, self.eval_batch_size)
                yield slot, self._place(arrays)
            return
        for call in packed_calls(data.ids, self.eval_batch_size, self.pad_id, self.devices):
            yield call.index, self._place(call_arrays(call, slot_labels(data, call.index)))

    def _place(self, batch: Batch) -> Batch:
        if self.mesh is None:
            return batch
        from mtl_jax.training.parallel import shard_batch

        return shard_batch(batch, self.mesh)
