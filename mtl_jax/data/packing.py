"""Host-side packing: several sentences share one row of tokens.

Sentences are packed, best fit decreasing, into rows of at least ``PACK_LENGTH`` tokens.
Every token carries its position inside its own sentence and a segment number (which
sentence of the row it belongs to); ``mtl_jax.model.encoder.Encoder`` attends block-diagonally
over segments and the model pools per segment, so a packed sentence gets the vector it
gets alone, up to float rounding (tests/test_packing.py). Rows come out nearly full
(what that buys is measured by ``benchmarks/encode.py``; see docs/performance.md).

Shapes stay bounded: a row is PACK_LENGTH tokens long, or (for inputs with longer
sentences) the inference bucket that holds the longest one (``row_lengths``); a call holds a
fixed number of rows for its row length (fewer, a power of two, for an input of only a few
rows). So an input compiles two shapes at most. Training batches (``mtl_jax.data.batching``)
pack into the same row lengths.
"""

from __future__ import annotations

import bisect
import functools
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# The row lengths a packed row may have: fine steps leave little free space behind a long sentence.
ROW_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Short sentences share rows of this many tokens: per token as fast as padded rows of 32 on
# 2 cores (longer rows spend more on attention across the row).
PACK_LENGTH = 64
MAX_SEGMENTS = 16  # sentences in one row at most: the static size of the pooled output
TOKENS_PER_SENTENCE = 24  # a call of batch_size sentences holds about batch_size * 24 tokens


@dataclass
class PackedCall:
    """One call's worth of rows: ``[R, P]`` arrays and where each pooled slot goes."""

    ids: np.ndarray  # [R, P] int32 token ids
    positions: np.ndarray  # [R, P] int32 position of each token inside its sentence
    segments: np.ndarray  # [R, P] int32 1..MAX_SEGMENTS: the token's sentence in its row; 0 = padding
    index: np.ndarray  # [R * MAX_SEGMENTS] the input (example) each pooled slot holds; -1 = none
    part: np.ndarray  # [R * MAX_SEGMENTS] which of its example's segments a slot holds (0: the first)
    offset: np.ndarray  # [R * MAX_SEGMENTS] the slot's first token in its row

    @property
    def sentences(self) -> int:
        return int((self.index >= 0).sum())

    @property
    def first(self) -> np.ndarray:
        """``[R * MAX_SEGMENTS]`` bool: the slots that hold an example's first segment (where its label goes)."""
        return (self.index >= 0) & (self.part == 0)

    def tokens_of(self, slot: int) -> tuple[int, int]:
        """``(row, first token)`` of the segment in ``slot``."""
        return slot // MAX_SEGMENTS, int(self.offset[slot])


class StoredUnits:
    """Every example's token ids (packing units) as views of flat arrays: the ids ``[T]`` (any integer
    dtype, e.g. uint16 memory-mapped from a store), each segment's start ``[S + 1]``, each example's
    first segment ``[N + 1]`` and whether it is a tuple of segments ``[N]``. ``units[i]`` is what a
    list of units would hold (int32)."""

    def __init__(self, ids: np.ndarray, segment_starts: np.ndarray, example_starts: np.ndarray, is_tuple: np.ndarray):
        self.ids = ids
        self.segment_starts = segment_starts
        self.example_starts = example_starts
        self.is_tuple = is_tuple

    def __len__(self) -> int:
        return len(self.is_tuple)

    def __getitem__(self, i: int):
        first, last = int(self.example_starts[i]), int(self.example_starts[i + 1])
        segments = tuple(
            np.asarray(self.ids[self.segment_starts[s] : self.segment_starts[s + 1]], np.int32)
            for s in range(first, last)
        )
        return segments if self.is_tuple[i] else segments[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """``[N]`` int32: each example's tokens (all its segments), without reading the ids (once; a
        million examples at a time, so a store's offsets are not all mapped in at once)."""

        def span(a: int, b: int) -> np.ndarray:
            starts = self.segment_starts[self.example_starts[a : b + 1]]
            return starts[1:] - starts[:-1]

        return by_range(len(self), span, np.int32, self.segment_starts, self.example_starts)

    def release(self) -> None:
        """Let a memory-mapped store's pages go (see :func:`drop_pages`)."""
        for a in (self.ids, self.segment_starts, self.example_starts, self.is_tuple):
            drop_pages(a)

    @property
    def widest(self) -> int:
        ex = self.example_starts
        return max((int(np.diff(ex[a : b + 1]).max()) for a, b in paged_ranges(len(self), ex)), default=1)

    @classmethod
    def of(cls, units: list, dtype=np.int32) -> StoredUnits:
        """Units (arrays, or tuples of arrays) as flat arrays of ``dtype``."""
        segments = [unit_segments(u) for u in units]
        flat = [seg for segs in segments for seg in segs]
        seg_starts = offsets(np.array([len(seg) for seg in flat], np.int64))
        ex_starts = offsets(np.array([len(segs) for segs in segments], np.int64))
        ids = np.concatenate(flat).astype(dtype) if flat else np.zeros(0, dtype)
        return cls(ids, seg_starts, ex_starts, np.array([isinstance(u, tuple) for u in units], bool))


def drop_pages(a: np.ndarray) -> None:
    """Let the kernel drop this process's mapping of a memory-mapped array's pages (read from the page
    cache or the file again when touched). Reads scattered over a large store (a step's examples, a
    plan window's text keys) would otherwise map in nearly all of it: a 64 KiB read-around per example
    read covers a 1.6 GB file after a few hundred thousand examples."""
    mapped = getattr(a, "_mmap", None)  # (np.memmap and its views; np.load(mmap_mode=...) arrays)
    if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


PAGED_RANGE = 1 << 20  # examples per range of a pass over a split (paged_ranges)


def paged_ranges(n: int, *mapped: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive ranges ``(a, b)`` of ``n`` (``PAGED_RANGE`` long), the pages of the memory-mapped
    arrays ``mapped`` let go after each: a pass over a large store holds one range of it, not the
    store's arrays."""
    for a in range(0, n, PAGED_RANGE):
        yield a, min(a + PAGED_RANGE, n)
        for m in mapped:
            drop_pages(m)


def by_range(n: int, fn, dtype, *mapped: np.ndarray) -> np.ndarray:
    """``[n]`` of ``dtype``: ``fn(a, b)``, the values of ``a:b``, over :func:`paged_ranges` (so no
    int64 temporary of the whole length either)."""
    out = np.empty(n, dtype)
    for a, b in paged_ranges(n, *mapped):
        out[a:b] = fn(a, b)
    return out


def offsets(lengths: np.ndarray) -> np.ndarray:
    """``[N + 1]`` int64: where each of ``N`` consecutive runs of ``lengths`` starts, and the end."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def unit_segments(unit) -> tuple[np.ndarray, ...]:
    """The segments of one packing unit: an example's token ids (an array, or a tuple of arrays
    that must share a row, e.g. the two sentences of a pair)."""
    return unit if isinstance(unit, tuple) else (unit,)


def unit_length(unit) -> int:
    return sum(len(s) for s in unit_segments(unit))


def row_lengths(longest: int, pack: int = PACK_LENGTH) -> tuple[int, ...]:
    """The row lengths for sentences of at most ``longest`` tokens, two at most (two compiled
    shapes): ``pack`` (PACK_LENGTH, or :func:`pack_length`'s choice), which short sentences share,
    and the inference bucket that holds the longest sentence when that is longer (a rare long
    sentence, short ones in its free space)."""
    top = bucket_for(max(longest, 1), ROW_BUCKETS + (longest,))
    return tuple(sorted({min(pack, top), top}))


PACK_CHOICES = (PACK_LENGTH, 128)  # the shared row lengths a training split may pack into (96 left a step
# now and then needing far more rows than the rest, and a step's grid is the largest any step needs)
PACK_SAVING = 0.10  # a longer shared row must save this share of the tokens (its attention costs more a token)


def pack_length(lengths: np.ndarray, widest: int, group: int = 64, sample: int = 2048) -> int:
    """The shared row length of a training split whose examples have several segments (which must
    share a row: pairs, hard negatives): of :data:`PACK_CHOICES`, the one whose rows hold a seeded
    sample, packed ``group`` examples at a time as steps are, in the fewest tokens, a longer one
    only when it saves :data:`PACK_SAVING` (three texts of 17 tokens fill 64-token rows to 78%,
    128-token rows to 91%). Single sentences keep PACK_LENGTH."""
    if widest == 1 or not len(lengths):
        return PACK_LENGTH
    rng = np.random.default_rng(0)
    pick = np.asarray(lengths if len(lengths) <= sample else rng.choice(lengths, sample, replace=False))
    best, fewest = PACK_LENGTH, None
    for length in PACK_CHOICES:
        allowed = row_lengths(int(pick.max()), length)
        parts = [pick[i : i + group] for i in range(0, len(pick), group)]
        tokens = sum(row for part in parts for row, _ in pack_rows(part, allowed, widest=widest))
        if fewest is None or tokens < (1 - PACK_SAVING) * fewest:
            best, fewest = length, tokens
    return best


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def pack_rows(
    lengths: Sequence[int], lengths_allowed: Sequence[int], max_segments: int = MAX_SEGMENTS, widest: int = 1
) -> list[tuple[int, list[int]]]:
    """``(row length, unit indices)`` per row, best fit decreasing.

    Longest units first; each joins the open row whose free space fits it most tightly, or
    opens a row of the smallest allowed length that holds it. A row closes when it cannot
    take another ``widest`` segments (the most segments a unit has) within ``max_segments``.
    """
    free_sizes: list[int] = []  # the free spaces some open row has, ascending
    rows_at: dict[int, list[int]] = {}  # open rows by free space
    rows: list[tuple[int, list[int]]] = []
    lengths = np.asarray(lengths, dtype=np.int64)
    sizes = lengths.tolist()
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = sizes[i]
        k = bisect.bisect_left(free_sizes, n)  # the tightest open row that fits
        if k < len(free_sizes):
            free = free_sizes[k]
            r = rows_at[free].pop()
            if not rows_at[free]:
                del free_sizes[k], rows_at[free]
        else:
            r = len(rows)
            free = bucket_for(n, lengths_allowed)
            rows.append((free, []))
        members = rows[r][1]
        members.append(i)
        if (len(members) + 1) * widest <= max_segments:  # room for one more unit of any width
            left = free - n
            if left not in rows_at:
                bisect.insort(free_sizes, left)
                rows_at[left] = []
            rows_at[left].append(r)
    return rows


def rows_per_call(length: int, batch_size: int, total_rows: int) -> int:
    """Rows in each call of ``length``-token rows when the input packs into ``total_rows`` rows:
    about ``batch_size`` * TOKENS_PER_SENTENCE tokens, or the power of two at or above
    ``total_rows`` when that is fewer (one short sentence costs one short row, not a call
    of empty rows). Within one input, one shape per row length."""
    full = max(1, batch_size * TOKENS_PER_SENTENCE // length)
    return min(full, 1 << max(total_rows - 1, 0).bit_length())


def fill_rows(
    units: Sequence,
    rows: Sequence[Sequence[int]],
    shape: tuple[int, int],
    pad_id: int,
    max_segments: int = MAX_SEGMENTS,
) -> PackedCall:
    """A ``shape`` = ``[R, P]`` call whose row ``r`` holds the units ``rows[r]`` (indices into
    ``units``, see :func:`unit_segments`) one segment after the other; rows past ``len(rows)`` stay empty."""
    num_rows, length = shape
    slots = num_rows * max_segments
    call = PackedCall(
        ids=np.full(shape, pad_id, np.int32),
        positions=np.zeros(shape, np.int32),
        segments=np.zeros(shape, np.int32),
        index=np.full(slots, -1, np.int64),
        part=np.zeros(slots, np.int64),
        offset=np.zeros(slots, np.int64),
    )
    for r, members in enumerate(rows):
        offset, s = 0, 0
        for i in members:
            for j, seg in enumerate(unit_segments(units[i])):
                n = len(seg)
                call.ids[r, offset : offset + n] = seg
                call.positions[r, offset : offset + n] = np.arange(n)
                call.segments[r, offset : offset + n] = s + 1
                slot = r * max_segments + s
                call.index[slot], call.part[slot], call.offset[slot] = i, j, offset
                offset += n
                s += 1
    return call


def slot_values(call: PackedCall, slots: np.ndarray, values: np.ndarray, lengths: np.ndarray, per_token: bool):
    """A call's outputs ``values`` at ``slots`` (each an input's first slot): per slot (``[R, S, ...]``)
    the slot's value, ``[len(slots), ...]``, or per token (``[R, P, ...]``, ``per_token``) the values of
    input i's ``lengths[i]`` tokens, an object array of them."""
    if not per_token:
        return values.reshape((-1,) + values.shape[2:])[slots]
    out = np.empty(len(slots), object)
    for j, slot in enumerate(slots):
        row, at = call.tokens_of(slot)
        out[j] = values[row, at : at + int(lengths[call.index[slot]])]
    return out


def gather(out: dict, name: str, call: PackedCall, values: np.ndarray, lengths: np.ndarray, per_token: bool) -> None:
    """A call's outputs ``values`` into ``out[name]``, one entry per input (``len(lengths)`` of them), as
    :func:`slot_values` gives them."""
    first = np.flatnonzero(call.first)
    got = slot_values(call, first, values, lengths, per_token)
    if name not in out:
        out[name] = (
            np.empty(len(lengths), object) if per_token else np.zeros((len(lengths),) + got.shape[1:], got.dtype)
        )
    out[name][call.index[first]] = got


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (rows split evenly over the devices)."""
    return -(-n // multiple) * multiple


def packed_calls(ids: Sequence, batch_size: int, pad_id: int, row_multiple: int = 1) -> Iterator[PackedCall]:
    """Every unit (sentence, or an example's segments) exactly once, in calls of packed rows.

    Rows of one length go together, ``rows_per_call(...)`` per call (rounded up to a multiple
    of ``row_multiple``: the devices a call is split over); the last call of a length is
    filled up with empty rows, so its shape is the same.
    """
    if isinstance(ids, StoredUnits):  # (from the segment starts: no unit is read to be measured)
        lengths, widest = ids.lengths, ids.widest
    else:
        lengths = np.array([unit_length(u) for u in ids], np.int64)
        widest = max((len(unit_segments(u)) for u in ids), default=1)
    rows = pack_rows(lengths, row_lengths(int(lengths.max()) if len(lengths) else 1), widest=widest)
    by_length: dict[int, list[list[int]]] = {}
    for length, members in rows:
        by_length.setdefault(length, []).append(members)
    for length in sorted(by_length):
        group = by_length[length]
        per_call = round_up(rows_per_call(length, batch_size, len(rows)), row_multiple)
        for start in range(0, len(group), per_call):
            yield fill_rows(ids, group[start : start + per_call], (per_call, length), pad_id)
