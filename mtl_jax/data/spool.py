"""Examples tokenized as they are read, for the token store: each chunk of texts is tokenized on a
background thread while the reader reads the next one, and its ids are appended to a file, so no
text and no array per example outlives its chunk. What stays in memory is a few numbers per
example (its segments' lengths, whether it was cut) and, for word lists, where each word starts.

:func:`take_units` then writes the examples of one split, in the split's order, as flat arrays.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl_jax.data.packing import StoredUnits, drop_pages, offsets
from mtl_jax.data.text import TextTokenizer

AHEAD = 2  # chunks tokenized ahead of the reader at most


@dataclass
class Spooled:
    """Every spooled example: its ids (memory-mapped), whether it was cut, and where the words of a
    word list start (by example)."""

    units: StoredUnits
    truncated: np.ndarray
    word_starts: dict[int, np.ndarray]


class TokenSpool:
    """``add(texts)`` tokenizes a chunk (in the background) and says which units it became;
    ``finish()`` gives them all. Ids go to ``path`` as ``dtype``."""

    def __init__(self, path: Path, tokenizer: TextTokenizer, max_length: int, dtype=np.uint16):
        self.path, self.tokenizer, self.max_length, self.dtype = path, tokenizer, max_length, dtype
        self.file = open(path, "wb")
        self.count = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.pending: deque[Future] = deque()
        self.segment_lengths: list[np.ndarray] = []
        self.segment_counts: list[np.ndarray] = []
        self.is_tuple: list[np.ndarray] = []
        self.truncated: list[np.ndarray] = []
        self.word_starts: dict[int, np.ndarray] = {}

    def add(self, texts: list) -> np.ndarray:
        """Spool a chunk of texts; the numbers of the units they become."""
        first = self.count
        self.count += len(texts)
        self.pending.append(self.pool.submit(self._encode, texts, first))
        while len(self.pending) > AHEAD:
            self.pending.popleft().result()
        return np.arange(first, self.count, dtype=np.int64)

    def _encode(self, texts: list, first: int) -> None:  # (one worker: chunks land in order)
        flat = self.tokenizer.encode_flat(texts, self.max_length)
        self.file.write(flat.ids.astype(self.dtype).tobytes())
        self.segment_lengths.append(flat.segment_lengths.astype(np.int32))
        self.segment_counts.append(flat.segment_counts.astype(np.int16))
        self.is_tuple.append(flat.is_tuple)
        self.truncated.append(flat.truncated)
        self.word_starts.update((first + i, w) for i, w in enumerate(flat.word_starts) if w is not None)

    def finish(self) -> Spooled:
        """Every unit spooled so far (the file closed, its ids memory-mapped)."""
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()
        self.file.close()
        cat = lambda parts, dtype: np.concatenate([np.zeros(0, dtype)] + parts)  # noqa: E731
        lengths = cat(self.segment_lengths, np.int32)
        counts = cat(self.segment_counts, np.int16)
        size = int(lengths.sum(dtype=np.int64))
        ids = np.memmap(self.path, self.dtype, "r", shape=(size,)) if size else np.zeros(0, self.dtype)
        units = StoredUnits(ids, offsets(lengths), offsets(counts), cat(self.is_tuple, bool))
        return Spooled(units, cat(self.truncated, bool), self.word_starts)

    def close(self) -> None:
        """Stop (an error while reading): nothing more is tokenized."""
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)
        self.file.close()


def ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Every index of ``[starts[i], ends[i])`` for each i, in order (one vectorised gather)."""
    lengths = ends - starts
    return np.repeat(starts - offsets(lengths)[:-1], lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


TAKE_CHUNK = 1 << 16  # examples gathered at a time (a few int64 temporaries per token)


def take_units(units: StoredUnits, idx: np.ndarray, ids_out: np.ndarray) -> StoredUnits:
    """Examples ``idx`` of ``units``, in that order, their ids written into ``ids_out`` (as long as
    their tokens: a memory-mapped file) a chunk of examples at a time."""
    segment_lengths, at = [], 0
    for start in range(0, len(idx), TAKE_CHUNK):
        part = idx[start : start + TAKE_CHUNK]
        segments = ranges(units.example_starts[part], units.example_starts[part + 1])
        tokens = ranges(units.segment_starts[segments], units.segment_starts[segments + 1])
        ids_out[at : at + len(tokens)] = units.ids[tokens]
        at += len(tokens)
        if hasattr(ids_out, "flush"):
            ids_out.flush()  # (written back before its pages are let go)
        drop_pages(ids_out), drop_pages(units.ids)
        segment_lengths.append(units.segment_starts[segments + 1] - units.segment_starts[segments])
    lengths = np.concatenate([np.zeros(0, np.int64)] + segment_lengths)
    counts = units.example_starts[idx + 1] - units.example_starts[idx]
    return StoredUnits(ids_out, offsets(lengths), offsets(counts), units.is_tuple[idx])
