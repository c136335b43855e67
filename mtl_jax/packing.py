"""Host-side packing: several sentences share one row of tokens.

Sentences are packed, best fit decreasing, into rows of at least ``PACK_LENGTH`` tokens.
Every token carries its position inside its own sentence and a segment number (which
sentence of the row it belongs to); ``mtl_jax.encoder.Encoder`` attends block-diagonally
over segments and the model pools per segment, so a packed sentence gets the vector it
gets alone, up to float rounding (tests/test_packing.py). Rows come out nearly full
(what that buys is measured by ``benchmarks/encode.py``; see the README).

Shapes stay bounded: a row's length is one of the inference buckets (>= ``PACK_LENGTH``)
and, within one input, a call holds a fixed number of rows for its row length (fewer, a
power of two, for an input of only a few rows), so one compiled shape per bucket.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mtl_jax.text import INFERENCE_BUCKETS, bucket_for, bucket_lengths

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
    index: np.ndarray  # [R * MAX_SEGMENTS] the input sentence each pooled slot holds; -1 = none

    @property
    def sentences(self) -> int:
        return int((self.index >= 0).sum())


def row_lengths(max_length: int) -> tuple[int, ...]:
    """The row lengths packing uses with ``max_length``: inference buckets from PACK_LENGTH on."""
    buckets = bucket_lengths(max_length, INFERENCE_BUCKETS)
    return tuple(b for b in buckets if b >= min(PACK_LENGTH, max_length))


def pack_rows(
    lengths: Sequence[int], lengths_allowed: Sequence[int], max_segments: int = MAX_SEGMENTS
) -> list[tuple[int, list[int]]]:
    """``(row length, sentence indices)`` per row, best fit decreasing.

    Longest sentences first; each joins the open row whose free space fits it most tightly,
    or opens a row of the smallest allowed length that holds it. A row closes when it holds
    ``max_segments`` sentences.
    """
    longest = lengths_allowed[-1]
    open_at = np.zeros(longest + 1, np.int64)  # open rows by free space
    rows_at: list[list[int]] = [[] for _ in range(longest + 1)]
    rows: list[tuple[int, list[int]]] = []
    for i in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable"):
        n = int(lengths[i])
        fits = np.flatnonzero(open_at[n:])
        if fits.size:
            free = n + int(fits[0])
            r = rows_at[free].pop()
            open_at[free] -= 1
        else:
            r = len(rows)
            free = bucket_for(n, lengths_allowed)
            rows.append((free, []))
        members = rows[r][1]
        members.append(int(i))
        if len(members) < max_segments:
            rows_at[free - n].append(r)
            open_at[free - n] += 1
    return rows


def rows_per_call(length: int, batch_size: int, total_rows: int) -> int:
    """Rows in each call of ``length``-token rows when the input packs into ``total_rows`` rows:
    about ``batch_size`` * TOKENS_PER_SENTENCE tokens, or the power of two at or above
    ``total_rows`` when that is fewer (one short sentence costs one short row, not a call
    of empty rows). Within one input, one shape per row length."""
    full = max(1, batch_size * TOKENS_PER_SENTENCE // length)
    return min(full, 1 << max(total_rows - 1, 0).bit_length())


def packed_calls(ids: Sequence[np.ndarray], max_length: int, batch_size: int, pad_id: int) -> Iterator[PackedCall]:
    """Every sentence (token ids, at most ``max_length`` each) exactly once, in calls of packed rows.

    Rows of one length go together, ``rows_per_call(...)`` per call; the last call of a length
    is filled up with empty rows, so its shape is the same.
    """
    rows = pack_rows([len(s) for s in ids], row_lengths(max_length))
    by_length: dict[int, list[list[int]]] = {}
    for length, members in rows:
        by_length.setdefault(length, []).append(members)
    for length in sorted(by_length):
        group = by_length[length]
        per_call = rows_per_call(length, batch_size, len(rows))
        for start in range(0, len(group), per_call):
            call = PackedCall(
                ids=np.full((per_call, length), pad_id, np.int32),
                positions=np.zeros((per_call, length), np.int32),
                segments=np.zeros((per_call, length), np.int32),
                index=np.full(per_call * MAX_SEGMENTS, -1, np.int64),
            )
            for r, members in enumerate(group[start : start + per_call]):
                offset = 0
                for s, i in enumerate(members):
                    n = len(ids[i])
                    call.ids[r, offset : offset + n] = ids[i]
                    call.positions[r, offset : offset + n] = np.arange(n)
                    call.segments[r, offset : offset + n] = s + 1
                    call.index[r * MAX_SEGMENTS + s] = i
                    offset += n
            yield call
