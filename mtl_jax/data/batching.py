"""From tokenized examples to device batches: packed batches and :class:`InputPipeline`, which
holds what every batch needs (the tokenized splits, pad id, batch sizes, the grids, the device
mesh). Which examples a step holds is the epoch plan's (``mtl_jax.data.plans``).

A training step's examples are packed several to a row (``mtl_jax.data.packing``) into a fixed
grid ``[rows, length]``: ``length`` is one of two row lengths (``packing.row_lengths``: the
short one unless the step holds a longer example) and ``rows`` the most any planned step of
the run needs at that length (a long run: a sample of its steps, grown when a later step needs
more; see :attr:`InputPipeline.grids`), so a phase compiles two step shapes at most (and one
more per growth, which a long run rarely has). A packed batch
is ``ids``, ``positions``, ``segments`` ``[R, P]`` and per task its ``labels`` ``[R, S, ...]`` (slot
``s`` of row ``r``: the row's ``s``-th segment; an example's label sits at its first segment's slot,
and the task's "no label" everywhere else) or, for a token-level task (tagging), ``[R, P]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data.load import Examples
from mtl_jax.data.packing import (
    MAX_SEGMENTS,
    PackedCall,
    StoredUnits,
    bucket_for,
    fill_rows,
    pack_rows,
    packed_calls,
    round_up,
    row_lengths,
    unit_segments,
)
from mtl_jax.data.plans import EpochPlan, TextKeys, epoch_plan, probe_indices, task_plan
from mtl_jax.data.text import TextTokenizer
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.tasks.base import has_label, no_label_like


@flax.struct.dataclass
class TokenBatch:
    """Packed rows of tokens (see :mod:`mtl_jax.data.packing`) and their labels. Task-stacked (every
    task in each step): each array has a task axis after the rows (``[R, T, ...]``)."""

    ids: np.ndarray  # [R, P] int32 token ids
    positions: np.ndarray  # [R, P] each token's position in its own sentence
    segments: np.ndarray  # [R, P] the sentence (1..S) a token belongs to; 0: padding
    labels: dict  # task -> [R, S, ...] per slot (its "no label" where none), or [R, P] per token
    num_segments: int = flax.struct.field(pytree_node=False, default=MAX_SEGMENTS)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape that a compiled step is specialised to."""
        return tuple(self.ids.shape)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def outputs(self, model, variables, deterministic: bool, encoder_deterministic: bool, rngs) -> dict:
        """``{task: [R, S, ...] or [R, P, ...]}``: every slot through the encoder and the heads."""
        return model.apply(
            variables, self.ids, self.positions, self.segments, self.num_segments, deterministic=deterministic,
            encoder_deterministic=encoder_deterministic, rngs=rngs, method="classify_packed",
        )  # fmt: skip


@flax.struct.dataclass
class EmbeddingBatch:
    """Cached pooled embeddings of a frozen encoder, one per slot, and their labels."""

    embeddings: np.ndarray  # [R, S, D] float32 (zeros in an empty slot)
    labels: dict  # task -> [R, S, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.embeddings.shape)

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]

    def outputs(self, model, variables, deterministic: bool, encoder_deterministic: bool, rngs) -> dict:
        """``{task: [R, S, ...]}``: the heads alone."""
        return model.apply(variables, self.embeddings, deterministic=deterministic, rngs=rngs, method="classify")


Batch = TokenBatch | EmbeddingBatch


def tokenize(examples: Examples, tokenizer: TextTokenizer, max_length: int) -> Tokenized:
    """Token ids of every example; per-word tags (an object label array) become per-token labels
    on each word's first sub-token."""
    encoded = tokenizer.encode_examples(examples.texts, max_length)
    lengths = [len(u) for u in encoded.ids]
    labels = {}
    for name, y in examples.labels.items():
        labels[name] = y if y.dtype != object else token_labels(y, lengths, encoded.word_starts)
    return Tokenized(encoded.ids, labels, examples.source, int(encoded.truncated.sum()))


def token_labels(tags: np.ndarray, lengths: Sequence[int], word_starts: Sequence) -> np.ndarray:
    """Per-word tag ids (``[N]`` object, None: no label) as per-token labels on each word's first
    sub-token (-1 elsewhere), for examples of ``lengths`` tokens whose words start at ``word_starts``."""
    out = np.empty(len(tags), object)
    for i, (words, length, starts) in enumerate(zip(tags, lengths, word_starts)):
        if words is None:
            continue
        y = np.full(length, -1, np.int32)
        kept = starts >= 0
        y[starts[kept]] = np.asarray(words)[kept]
        out[i] = y
    return out


@dataclass(frozen=True)
class Grid:
    """A packed batch's shape: ``rows`` rows of ``length`` tokens."""

    rows: int
    length: int


class GridOverflow(ValueError):
    """A step's examples need more rows than its grid has (``rows``: how many)."""

    def __init__(self, examples: int, rows: int, grid: Grid):
        super().__init__(f"{examples} examples need {rows} rows of {grid.length} tokens; the grid has {grid.rows}")
        self.rows = rows


def pack_examples(
    data: Tokenized, idx: np.ndarray, grid: Grid, pad_id: int, host: tuple[int, int] = (0, 1)
) -> tuple[Batch, PackedCall]:
    """Examples ``idx`` packed into ``grid``: the batch and its layout (``index``: the example each
    slot holds, ``-1``: empty). ``host`` = (process, processes): that process's block of the grid's
    rows alone (the rows are laid out from the examples' lengths; only the examples in the block are
    read), so each process of a multi-process run reads and packs what it feeds.

    With cached embeddings an :class:`EmbeddingBatch`: each segment's embedding in the slot its
    tokens would have, so the heads see the same rows (and dropout masks) as in a forward pass
    through the encoder.
    """
    idx = np.asarray(idx)
    rows = pack_rows(data.lengths[idx], (grid.length,), widest=data.widest)
    if len(rows) > grid.rows:
        raise GridOverflow(len(idx), len(rows), grid)
    block = grid.rows // host[1]
    mine = [members for _, members in rows][host[0] * block : (host[0] + 1) * block]
    held = np.unique(np.asarray([i for members in mine for i in members], np.int64))  # positions in idx
    at = {int(p): k for k, p in enumerate(held)}
    call = fill_rows([data.ids[i] for i in idx[held]], [[at[i] for i in m] for m in mine], (block, grid.length), pad_id)
    held_idx = idx[held] if len(held) else np.zeros(1, np.int64)
    call.index = np.where(call.index >= 0, held_idx[np.maximum(call.index, 0)], -1)
    labels = slot_labels(data, call)
    if data.embeddings is not None:
        return EmbeddingBatch(slot_embeddings(data, call), labels), call
    return call_arrays(call, labels), call


def call_arrays(call: PackedCall, labels: dict) -> TokenBatch:
    """A packed call as a step's batch with its labels (see :func:`slot_labels`)."""
    return TokenBatch(call.ids, call.positions, call.segments, labels)


def slot_labels(data: Tokenized, call: PackedCall) -> dict[str, np.ndarray]:
    """Per task the labels of a call's examples: ``[R, S, ...]`` at each example's first slot, or
    ``[R, P]`` per token (a token-level task); the task's "no label" elsewhere."""
    rows = len(call.index) // MAX_SEGMENTS
    first = call.first
    out = {}
    for name, y in data.labels.items():
        if y.dtype == object:
            out[name] = _token_slot_labels(y, call)
            continue
        fill = no_label_like(y.dtype)
        taken = y[np.maximum(call.index, 0)]
        mask = first.reshape((-1,) + (1,) * (y.ndim - 1))
        out[name] = np.where(mask, taken, fill).astype(y.dtype).reshape((rows, MAX_SEGMENTS) + y.shape[1:])
    return out


def _token_slot_labels(y: np.ndarray, call: PackedCall) -> np.ndarray:
    """``[R, P]`` int32: the per-token labels of the examples in a call, where their tokens are."""
    out = np.full(call.segments.shape, -1, np.int32)
    for slot in np.flatnonzero(call.first):
        labels = y[call.index[slot]]
        if labels is not None:
            r, at = call.tokens_of(slot)
            out[r, at : at + len(labels)] = labels
    return out


def slot_embeddings(data: Tokenized, call: PackedCall) -> np.ndarray:
    """``[R, S, D]`` float32: the cached embedding of each slot's segment (zeros in an empty slot)."""
    full = call.index >= 0
    emb = np.where(full[:, None], data.embeddings[np.maximum(call.index, 0), call.part], 0.0).astype(np.float32)
    return emb.reshape(-1, MAX_SEGMENTS, emb.shape[-1])


def embedding_batch(data: Tokenized, idx: np.ndarray, rows: int) -> tuple[EmbeddingBatch, PackedCall]:
    """Cached embeddings of examples ``idx`` for evaluation in ``rows`` rows of slots (an example's
    segments in consecutive slots of one row): the batch and its layout."""
    per_row = MAX_SEGMENTS // data.widest
    units = [tuple(seg[:0] for seg in unit_segments(data.ids[i])) for i in idx]  # no tokens: only the slots matter
    members = [list(range(start, min(start + per_row, len(idx)))) for start in range(0, len(idx), per_row)]
    call = fill_rows(units, members, (rows, 1), 0)
    call.index = np.where(call.index >= 0, np.asarray(idx)[np.maximum(call.index, 0)], -1)
    return EmbeddingBatch(slot_embeddings(data, call), slot_labels(data, call)), call


def single_rows(ids: np.ndarray, mask: np.ndarray, labels: dict) -> TokenBatch:
    """A padded batch (one sentence per row, ``ids``/``mask`` ``[B, L]``, per task ``labels`` ``[B]``) as a packed one."""
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return TokenBatch(ids, positions, mask, {k: v[:, None] for k, v in labels.items()}, num_segments=1)


def step_length(data: Tokenized, parts: Sequence[np.ndarray]) -> int:
    """The row length of a step holding ``parts``: the shortest of the training row lengths that fits."""
    longest = max(int(data.lengths[p].max()) for p in parts if len(p))
    return bucket_for(longest, row_lengths(data.longest, data.short_rows))


def plan_grids(data: Tokenized, plans: Iterator[list], task_stacked: bool, row_multiple: int = 1) -> dict[int, Grid]:
    """``{row length: Grid}`` holding every step of ``plans``, rows rounded up to ``row_multiple``."""
    lengths = data.lengths
    need: dict[int, int] = {}
    for plan in plans:
        for step in plan:
            parts = step if task_stacked else [step]
            length = step_length(data, parts)
            rows = max(len(pack_rows(lengths[p], (length,), widest=data.widest)) for p in parts)
            need[length] = max(need.get(length, 0), rows)
    return {n: Grid(round_up(r, row_multiple), n) for n, r in need.items()}


def micro_batches(batch, k: int):
    """The batch (any pytree of arrays ``[rows, ...]``) as ``k`` micro-batches (arrays ``[k, rows / k, ...]``):
    row ``r`` goes to micro-batch ``r % k``, so each device's rows split evenly over the micro-batches
    (and an example's segments, in one row, stay together)."""
    rows = jax.tree.leaves(batch)[0].shape[0]

    def split(x):
        return jnp.moveaxis(x.reshape((rows // k, k) + x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def micro_joined(x: jax.Array) -> jax.Array:
    """Per-micro-batch arrays ``[k, rows / k, ...]`` back in the batch's row order ``[rows, ...]``
    (the inverse of :func:`micro_batches` on one array)."""
    return jnp.moveaxis(x, 0, 1).reshape((-1,) + x.shape[2:])


def _stack(built: list[Batch], task_stacked: bool) -> Batch:
    """One step's batch from its parts; task-stacked: part ``t`` at ``[:, t]``."""
    if not task_stacked:
        return built[0]
    return jax.tree.map(lambda *parts: np.stack(parts, axis=1), *built)


def own_rows(batch: Batch, host: int, hosts: int) -> Batch:
    """Process ``host``'s contiguous block of the rows of every array of a global batch (the mesh
    orders devices by process, each process holding as many)."""
    if hosts == 1:
        return batch
    return jax.tree.map(lambda v: v[host * (len(v) // hosts) : (host + 1) * (len(v) // hosts)], batch)


def unplaced(batch: Batch) -> Batch:
    """A batch left as host arrays (one device, or tests that read them)."""
    return batch


@dataclass
class InputPipeline:
    """What every batch of a run needs, in one place: the tokenized splits, the pad id, the
    batch sizes, the sampling, the epochs the grids are sized for, the number of devices a
    batch is split over and how a batch gets onto them (``place``: the trainer's sharding).

    ``plan(epoch)`` gives an epoch's batches (example indices), ``train_batch`` one step's
    packed arrays on the devices, ``eval_batches`` every example of a split once.
    """

    splits: dict[str, Tokenized]
    pad_id: int
    max_length: int
    batch_size: int
    eval_batch_size: int
    seed: int
    steps: int | None = None  # the grids hold the run's first ``steps`` steps (setup sets them; None: one epoch)
    sampling: str = "proportional"
    temperature: float = 2.0
    task_stacked: bool = False  # every step holds every task (pcgrad): arrays [rows, T, ...]
    grad_accum: int = 1  # training rows come in multiples of devices x micro-batches x chunks
    chunks: int = 1  # gradient caching: each micro-batch's encoder pass in this many chunks
    distinct: tuple[str, ...] = ()  # tasks whose examples a step must not repeat (in-batch negatives)
    devices: int = 1  # devices a step's rows are split over
    place: Callable[[Batch], Batch] = unplaced  # this process's rows of a batch onto the devices
    host: tuple[int, int] = (0, 1)  # (this process, processes): each builds and places its block of rows
    log: Callable[[str], None] = lambda line: None  # where a grid's growth is told
    plans_kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # epoch -> plan
    packed: int = field(default=0, init=False, repr=False, compare=False)  # training examples packed so far

    RELEASE_EVERY = 1 << 8  # training examples packed between letting a store's mapped pages go (each read maps 64 KiB)
    GRID_SAMPLE = 4096  # steps the grids are sized from at most (a longer run: a seeded sample of them)
    GROWTH = 1.05  # a grid a step outgrows gets the rows it needs and this share more

    @property
    def train(self) -> Tokenized:
        return self.splits["train"]

    @property
    def num_tasks(self) -> int:
        return len(self.train.labels)

    @property
    def row_multiple(self) -> int:
        """Training rows come in multiples of this: every device's micro-batches' chunks alike."""
        return self.devices * self.grad_accum * self.chunks

    @functools.cached_property
    def grids(self) -> dict[int, Grid]:
        """``{row length: Grid}``: the (at most two) training step shapes. A run of at most
        :data:`GRID_SAMPLE` steps: the most rows any of its steps needs. A longer run: the most a seeded
        sample of epoch 0's steps needs (whole windows of the plan: nothing else is dealt, no step of
        the rest packed ahead), and a later step that needs more grows its grid (:meth:`train_batch`;
        the checkpoint keeps the grids, so a resumed run has the same shapes at the same steps)."""
        grids = plan_grids(self.train, self.sizing_plans(), self.task_stacked, self.row_multiple)
        self.train.release()  # (the lengths, labels and plan windows read in planning)
        return grids

    def sizing_plans(self) -> Iterator[list]:
        """The steps the grids are sized from (see :attr:`grids`)."""
        if self.run_steps <= self.GRID_SAMPLE:
            yield from self.run_plans()
            return
        plan, rng = self.plan(0), np.random.default_rng([self.seed, 17])
        if isinstance(plan, EpochPlan):
            yield plan.sample(self.GRID_SAMPLE, rng)
        else:
            yield [plan[k] for k in np.sort(rng.choice(len(plan), self.GRID_SAMPLE, replace=False))]

    def grid_rows(self) -> dict[str, int]:
        """``{row length: rows}`` of the grids (what a checkpoint keeps)."""
        return {str(length): g.rows for length, g in self.grids.items()}

    def restore_grids(self, rows: dict[str, int]) -> None:
        """Grids at least as large as a checkpoint's (:meth:`grid_rows`): the shapes the run had then."""
        for length, n in rows.items():
            have = self.grids.get(int(length))
            self.grids[int(length)] = Grid(max(n, have.rows if have else 0), int(length))

    def grow(self, length: int, rows: int) -> Grid:
        """The grid of ``length``-token rows, with room for ``rows`` rows and :data:`GROWTH` more."""
        grid = Grid(round_up(max(rows, int(np.ceil(rows * self.GROWTH))), self.row_multiple), length)
        was = self.grids.get(length)
        self.grids[length] = grid
        self.log(
            f"a step needs {rows} rows of {length} tokens (the grid had {was.rows if was else 0}): "
            f"{grid.rows} rows from here on, one more compiled shape"
        )
        return grid

    @property
    def run_steps(self) -> int:
        """The steps the run takes (``steps``; None: one epoch)."""
        return len(self.plan(0)) if self.steps is None else self.steps

    def run_plans(self) -> Iterator[list]:
        """The plans of the steps the run takes, epoch after epoch, the last cut where the run ends
        (a 200-step run over millions of examples sizes its grids from 200 steps, not an epoch)."""
        left, epoch = self.run_steps, 0
        while left > 0 and (plan := self.plan(epoch)):
            yield plan[:left]
            left, epoch = left - len(plan), epoch + 1

    def plan(self, epoch: int) -> list:
        """The batches of one epoch: example indices per step (per task and step when task-stacked);
        the last two asked for are kept (setup, the grids and the trainer all read epoch 0's)."""
        if epoch not in self.plans_kept:
            while len(self.plans_kept) >= 2:
                self.plans_kept.pop(next(iter(self.plans_kept)))
            self.plans_kept[epoch] = self._plan(epoch)
        return self.plans_kept[epoch]

    def _plan(self, epoch: int) -> list:
        if self.task_stacked:
            return task_plan(self.train, self.batch_size, self.seed, epoch, texts=self.text_keys)
        return epoch_plan(
            self.train, self.batch_size, self.seed, epoch, self.sampling, self.temperature, texts=self.text_keys
        )

    @functools.cached_property
    def text_keys(self) -> TextKeys | None:
        """Per training example of a ``distinct`` task, the keys of its texts, else None: what a step
        must not hold twice."""
        if not self.distinct:
            return None
        keyed = np.zeros(len(self.train), bool)
        for name in self.distinct:
            keyed |= has_label(self.train.labels[name])
        units = self.train.ids
        return TextKeys(units if isinstance(units, StoredUnits) else StoredUnits.of(list(units)), keyed)

    def examples_in(self, idx) -> int:
        return sum(len(i) for i in idx) if self.task_stacked else len(idx)

    def train_batch(self, idx, data: Tokenized | None = None) -> Batch:
        """One step's arrays (of ``data``, default the training split, e.g. with cached embeddings)."""
        data = self.train if data is None else data
        parts = idx if self.task_stacked else [idx]
        length = step_length(data, parts)
        grid = self.grids.get(length, Grid(0, length))  # (a row length the sized steps never had: grown)
        try:
            built = [pack_examples(data, p, grid, self.pad_id, self.host)[0] for p in parts]
        except GridOverflow:
            rows = max(len(pack_rows(data.lengths[p], (length,), widest=data.widest)) for p in parts)
            grid = self.grow(length, rows)
            built = [pack_examples(data, p, grid, self.pad_id, self.host)[0] for p in parts]
        self.packed += self.examples_in(idx)
        if self.packed % self.RELEASE_EVERY < self.examples_in(idx):
            data.release()
        return self.place(_stack(built, self.task_stacked))

    def probe_batch(self) -> TokenBatch:
        """The fixed task-stacked batch of the task-gradient diagnostics (its own grid)."""
        parts = probe_indices(self.train, self.batch_size, self.seed)
        (grid,) = plan_grids(self.train, [[parts]], task_stacked=True, row_multiple=self.devices).values()
        built = [pack_examples(self.train, p, grid, self.pad_id, self.host)[0] for p in parts]
        return self.place(_stack(built, True))

    def eval_batches(self, data: Tokenized) -> Iterator[tuple[np.ndarray, Batch]]:
        """``(layout, batch)`` covering every example of ``data`` once (``layout.index``: the example each
        slot holds, -1 = empty; see :class:`~mtl_jax.data.packing.PackedCall`)."""
        if data.embeddings is not None:
            per_row = MAX_SEGMENTS // data.widest
            rows = round_up(-(-self.eval_batch_size // per_row), self.devices)
            for start in range(0, len(data), rows * per_row):
                idx = np.arange(start, min(start + rows * per_row, len(data)))
                arrays, call = embedding_batch(data, idx, rows)
                yield call, self.place(own_rows(arrays, *self.host))
            return
        for call in packed_calls(data.ids, self.eval_batch_size, self.pad_id, self.devices):
            yield call, self.place(own_rows(call_arrays(call, slot_labels(data, call)), *self.host))
