"""Epoch plans: the examples each training step holds, a pure function of (seed, epoch), so a
resumed run continues at the same batch and every process of a multi-process run plans the same
global batch.

An epoch's batches are dealt a window at a time (``_balanced_batches``: batches of nearly equal
token counts, no text twice in a step where a task asks for it), and :class:`EpochPlan` deals a
window only when one of its batches is first asked for: the epoch's length and batch order come
from the examples' lengths alone (vectorized), so a run of 200 steps over twenty million pairs
deals at most 200 of the epoch's 9,766 windows before its first step.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np

from mtl_jax.data.packing import StoredUnits, offsets, paged_ranges
from mtl_jax.data.spool import ranges
from mtl_jax.data.tokenized import Tokenized, task_members
from mtl_jax.errors import MtlError


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


def task_plan(
    data: Tokenized, batch_size: int, seed: int, epoch: int, window: int = 64, texts: TextKeys | None = None
) -> list[list[np.ndarray]]:
    """Steps that hold every task (weighting methods with ``every_task``): each holds ``batch_size // T``
    examples of every task.

    An epoch has as many examples as the other plans (``len(data)``); each task cycles
    through its own shuffled examples (so every task weighs the same, whatever its size).
    Per task, sub-batches are balanced inside windows (``_balanced_batches``); the k-th
    shortest sub-batches of all tasks form one step (those holding long examples go
    together, so few steps need the long rows), then the steps are shuffled. ``texts``: see
    :func:`_balanced_batches`.
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
        subs = _balanced_batches(_draw(m, steps * rows, rng), lengths, data.short_rows, rows, window, texts)
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


class EpochPlan(Sequence):
    """The batches of one epoch (:func:`epoch_plan`): ``plan[k]``, the example indices of step k.

    Each source's drawn examples are cut into windows of ``rows x window`` examples; a window's
    batches are dealt (``deal``) when one of them is first asked for and kept, as one flat array,
    until the plan goes. How many batches a window gives depends only on how many of its examples
    are long, so the epoch's length and its shuffled batch order are known before any is dealt.
    """

    def __init__(self, orders: list[np.ndarray], is_long: np.ndarray, rows: int, window: int, deal, order_of):
        self.orders, self.deal = orders, deal
        spans = [
            (s, a, min(a + rows * window, len(o)))
            for s, o in enumerate(orders)
            for a in range(0, len(o), rows * window)
        ]
        self.spans = np.asarray(spans, np.int64).reshape(-1, 3)
        counts = np.zeros(len(spans), np.int64)
        for w, (s, a, b) in enumerate(spans):  # (one per window: 489 per million examples at batch 32)
            long = math.ceil(int(is_long[orders[s][a:b]].sum()) / rows) * rows
            counts[w] = math.ceil(min(long, b - a) / rows) + math.ceil(max(b - a - long, 0) / rows)
        self.first = offsets(counts)  # [W + 1] each window's first batch
        self.order = order_of(int(self.first[-1]))  # step k holds batch order[k]
        self.dealt: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window -> (indices, batch starts)
        self.lock = threading.Lock()  # the trainer's prefetch thread asks too

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        j = int(self.order[k])
        w = int(np.searchsorted(self.first, j, "right")) - 1
        flat, starts = self._window(w)
        b = j - int(self.first[w])
        return flat[starts[b] : starts[b + 1]].astype(np.int64)

    def sample(self, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The batches of a seeded choice of whole windows, about ``steps`` of them (only those
        windows are dealt): what a long run's grids are sized from."""
        per_window = max(1, len(self) // max(len(self.spans), 1))
        chosen = rng.choice(len(self.spans), min(len(self.spans), -(-steps // per_window)), replace=False)
        out = []
        for w in np.sort(chosen).tolist():
            flat, starts = self._window(w)
            out += [flat[starts[b] : starts[b + 1]].astype(np.int64) for b in range(len(starts) - 1)]
        return out

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if w not in self.dealt:
                s, a, b = self.spans[w]
                batches = self.deal(self.orders[s][a:b].astype(np.int64))
                expected = int(self.first[w + 1] - self.first[w])
                assert len(batches) == expected, (w, len(batches), expected)
                flat = np.concatenate(batches).astype(self.orders[s].dtype) if batches else np.zeros(0, np.int64)
                self.dealt[w] = (flat, offsets(np.array([len(x) for x in batches], np.int64)))
            return self.dealt[w]


def epoch_plan(
    data: Tokenized,
    batch_size: int,
    seed: int,
    epoch: int,
    sampling: str = "proportional",
    temperature: float = 2.0,
    window: int = 64,
    texts: TextKeys | None = None,
) -> EpochPlan:
    """The example indices of every batch of one epoch, a pure function of (seed, epoch).

    Sources are sampled per ``sampling``. Each batch holds examples of one source (one
    task's file), so a small task's few examples are not up-weighted by sharing a batch,
    and thus a per-task mean, with a large one. Inside a source the drawn examples are
    shuffled and dealt into batches of nearly equal token counts inside windows of
    ``window`` batches (``_balanced_batches``: every step fits a small packed grid; with ``texts``,
    no batch holds one text twice); then all batches are shuffled together.
    """
    rng = np.random.default_rng([seed, epoch])
    members = source_members(data.source)
    counts = sampling_counts([len(m) for m in members], sampling, temperature)
    orders = [_draw(m, k, rng) for m, k in zip(members, counts) if len(m) and k]
    lengths, short = data.lengths, data.short_rows

    def deal(order: np.ndarray) -> list[np.ndarray]:
        return _balanced_batches(order, lengths, short, batch_size, window, texts)

    return EpochPlan(orders, lengths > short, batch_size, window, deal, rng.permutation)


def source_members(source: np.ndarray) -> list[np.ndarray]:
    """Per source ``0..max``, its examples in order (int32 where they fit), ``source`` read a range
    at a time (:func:`~mtl_jax.data.packing.paged_ranges`)."""
    dtype = np.int32 if len(source) < 2**31 else np.int64
    parts: list[list[np.ndarray]] = []
    for a, b in paged_ranges(len(source), source):
        part = np.asarray(source[a:b])
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(int(part.max()) + 2))
        parts += [[] for _ in range(len(bounds) - 1 - len(parts))]
        for src in range(len(bounds) - 1):
            parts[src].append((order[bounds[src] : bounds[src + 1]] + a).astype(dtype))
    return [np.concatenate(p) for p in parts]


def _draw(members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``members``: shuffled passes over all of them, as many as needed, cut at ``k``
    (each pass ``rng.permutation(len(members))``, drawn into an array of ``members``' dtype)."""
    reps = []
    for _ in range(math.ceil(k / len(members))):
        shuffled = np.arange(len(members), dtype=members.dtype)
        rng.shuffle(shuffled)
        reps.append(members[shuffled])
    return reps[0][:k] if len(reps) == 1 else np.concatenate(reps)[:k]


def _balanced_batches(
    order: np.ndarray, lengths: np.ndarray, short: int, rows: int, window: int, texts: TextKeys | None = None
) -> list[np.ndarray]:
    """Batches of about ``rows`` from ``order`` whose token counts are nearly equal (so every step
    fits a small packed grid), inside windows of ``window`` batches.

    In a window, the examples longer than the ``short`` row length (``Tokenized.short_rows``) go
    into batches of their own (topped up with the next longest), which then pack into the long
    rows; each group is dealt longest first in snake order (batch 1, 2, ..., n, n, ..., 1, ...).
    With ``texts`` (:class:`TextKeys`), no batch holds two examples that share a text
    (:func:`_spread_repeats`).
    """
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
            dealt = [group[batch_of == b] for b in range(n)]
            batches.extend(dealt if texts is None else _spread_repeats(dealt, texts.of(chunk), lengths))
    return batches


def _spread_repeats(batches: list[np.ndarray], texts: Sequence, lengths: np.ndarray) -> list[np.ndarray]:
    """``batches`` with no two examples of a batch sharing a text (``texts[i]``: example i's text keys,
    or None): a repeat trades places with the example of another batch closest in length that
    repeats nothing on either side, or, when none can, leaves its batch (which gets one smaller).
    In-batch negatives then never score an example against a copy of its own text."""
    batches = [list(b) for b in batches]
    held = [Counter(k for i in b if texts[i] for k in texts[i]) for b in batches]
    for b, batch in enumerate(batches):
        j = 0
        while j < len(batch):
            i = batch[j]
            if not texts[i] or all(held[b][k] == 1 for k in texts[i]):
                j += 1
                continue
            swap = _trade(b, i, batches, held, texts, lengths)
            held[b].subtract(texts[i])
            if swap is None:
                batch.pop(j)
                continue
            c, jj = swap
            p = batches[c][jj]
            batches[c][jj], batch[j] = i, p
            held[c].subtract(texts[p] or ())
            held[c].update(texts[i])
            held[b].update(texts[p] or ())
            j += 1
    return [np.asarray(b, dtype=np.int64) for b in batches]


def _trade(b: int, i: int, batches: list[list], held: list[Counter], texts: Sequence, lengths: np.ndarray):
    """``(batch, position)`` of the example closest in length to ``i`` in another batch that ``i`` can
    trade places with (neither then holds a text twice), or None."""
    mine = texts[i]
    best = None
    for c, other in enumerate(batches):
        if c == b or any(held[c][k] > 0 for k in mine):
            continue
        for jj, p in enumerate(other):
            theirs = texts[p] or ()
            fits_b = all(held[b][k] - (k in mine) == 0 for k in theirs)
            fits_c = all(held[c][k] - (k in theirs) == 0 for k in mine)
            gap = abs(int(lengths[p]) - int(lengths[i]))
            if fits_b and fits_c and (best is None or gap < best[0]):
                best = (gap, c, jj)
    return None if best is None else best[1:]


class TextKeys:
    """What no step may hold twice: per example of a ``distinct`` task, the keys of its texts (a
    64-bit hash of each segment's token ids: equal ids, equal key), hashed when a window of the plan
    asks for them (nothing per example is kept)."""

    LONGEST = 1 << 13  # tokens a segment may have (an encoder's positions are fewer)

    def __init__(self, units: StoredUnits, keyed: np.ndarray):
        self.units, self.keyed = units, keyed  # keyed: [N] bool, the examples of a distinct task

    def of(self, idx: np.ndarray) -> dict[int, tuple[int, ...]]:
        """Examples ``idx``'s distinct keys (an example may repeat a text of its own; none where not keyed)."""
        idx = np.asarray(idx, np.int64)
        ex = self.units.example_starts
        hashed = segment_hashes(self.units, ranges(ex[idx], ex[idx + 1])).tolist()
        starts = offsets(ex[idx + 1] - ex[idx]).tolist()
        keyed = self.keyed[idx].tolist()
        self.units.release()
        return {
            i: tuple(dict.fromkeys(hashed[starts[j] : starts[j + 1]])) if keyed[j] else ()
            for j, i in enumerate(idx.tolist())
        }


WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**63, TextKeys.LONGEST + 1, np.uint64) | 1  # odd: no lost bits


def segment_hashes(units: StoredUnits, segments: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each segment's token ids (their weighted sum modulo 2**64, its length mixed in)."""
    a, b = units.segment_starts[segments], units.segment_starts[segments + 1]
    tokens = ranges(a, b)
    position = tokens - np.repeat(a, b - a)
    with np.errstate(over="ignore"):  # (sums modulo 2**64)
        mixed = units.ids[tokens].astype(np.uint64) * WEIGHTS[position + 1]
        offsets = np.minimum(np.concatenate([[0], np.cumsum(b - a)[:-1]]), max(len(tokens) - 1, 0))
        sums = np.add.reduceat(mixed, offsets) if len(tokens) else np.zeros(len(segments), np.uint64)
        return np.where(b > a, sums, 0) + (b - a).astype(np.uint64) * WEIGHTS[0]
