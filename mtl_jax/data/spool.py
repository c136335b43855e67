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
        self.segment_lengths, self.segment_counts = [], []  # (joined: the parts let go before the offsets)
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


TAKE_CHUNK = 1 << 14  # examples gathered at a time (a few int64 temporaries per token)


def take_sizes(units: StoredUnits, idx: np.ndarray) -> tuple[int, int]:
    """``(tokens, segments)`` of examples ``idx`` of ``units`` (a chunk at a time: nothing as long as ``idx``)."""
    tokens = segments = 0
    for start in range(0, len(idx), TAKE_CHUNK):
        part = idx[start : start + TAKE_CHUNK]
        first, last = units.example_starts[part], units.example_starts[part + 1]
        segments += int((last - first).sum())
        tokens += int((units.segment_starts[last] - units.segment_starts[first]).sum())
    return tokens, segments


def take_units(units: StoredUnits, idx: np.ndarray, out: StoredUnits) -> StoredUnits:
    """Examples ``idx`` of ``units``, in that order, written into ``out``'s arrays (sized by
    :func:`take_sizes`; memory-mapped files, whose pages are let go as they are written) a chunk of
    examples at a time: no array as long as the examples or their segments is built in memory."""
    out.segment_starts[0] = out.example_starts[0] = 0
    at_token = at_segment = 0
    for start in range(0, len(idx), TAKE_CHUNK):
        part = idx[start : start + TAKE_CHUNK]
        first, last = units.example_starts[part], units.example_starts[part + 1]
        segments = ranges(first, last)
        seg_first, seg_last = units.segment_starts[segments], units.segment_starts[segments + 1]
        tokens = ranges(seg_first, seg_last)
        out.ids[at_token : at_token + len(tokens)] = units.ids[tokens]
        out.segment_starts[at_segment + 1 : at_segment + 1 + len(segments)] = at_token + np.cumsum(seg_last - seg_first)
        out.example_starts[start + 1 : start + 1 + len(part)] = at_segment + np.cumsum(last - first)
        out.is_tuple[start : start + len(part)] = units.is_tuple[part]
        at_token, at_segment = at_token + len(tokens), at_segment + len(segments)
        for a in (out.ids, out.segment_starts, out.example_starts, out.is_tuple):
            if hasattr(a, "flush"):
                a.flush()  # (written back before its pages are let go)
        out.release(), drop_pages(units.ids)
    return out
