"""Tokenization shared by encoding, training and prediction: unpadded token ids per text
(``mtl_jax.data.packing`` lays them out in rows).

An example's text is a string (one sentence), or one of the kinds below: :class:`Segments`
(texts encoded separately, each its own segment of a packed row: a bi-encoder pair),
:class:`Joined` (texts encoded as one sequence, ``[CLS] a [SEP] b [SEP]``: a cross-encoder pair)
or :class:`Words` (pre-split words: a tagging example, labelled on each word's first sub-token).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mtl_jax.errors import MtlError

ENCODE_CHUNK = 8192  # texts per encode_batch call


class Segments(tuple):
    """Texts of one example that are encoded separately (each gets its own embedding)."""


class Joined(tuple):
    """Texts of one example encoded as one sequence: ``[CLS] a [SEP] b [SEP]``."""


class Words(tuple):
    """The words of one example, pre-split (tagging)."""


def check_texts(sentences, what: str = "sentences", pairs: bool = False) -> list:
    """A list of strings, or an error that names the first bad item's index; with ``pairs``, an item
    may also be a pair ``(a, b)`` of strings, returned as :class:`Joined` (one sequence)."""
    if isinstance(sentences, str):
        return [sentences]
    out = list(sentences)
    for i, s in enumerate(out):
        if pairs and isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(t, str) for t in s):
            out[i] = Joined(s)
        elif not isinstance(s, str):
            want = "str or a pair (str, str)" if pairs else "str"
            raise MtlError(f"{what}[{i}] is {type(s).__name__}, not {want}")
    return out


@dataclass
class Encoded:
    """Token ids per example (an array, or a tuple of arrays for :class:`Segments`), the token
    where each word starts (:class:`Words` only, else ``None``) and which examples were cut."""

    ids: list
    word_starts: list
    truncated: np.ndarray  # [N] bool


@dataclass
class Flat:
    """Examples' token ids as flat arrays: the ids ``[T]`` int32, each segment's length ``[S]``, each
    example's number of segments ``[N]``, whether it is a tuple of segments ``[N]``, whether it was
    cut ``[N]``, and the token where each word starts (:class:`Words` only, else ``None``) per example."""

    ids: np.ndarray
    segment_lengths: np.ndarray
    segment_counts: np.ndarray
    is_tuple: np.ndarray
    truncated: np.ndarray
    word_starts: list

    @staticmethod
    def join(parts: Sequence[Flat]) -> Flat:
        if len(parts) == 1:
            return parts[0]
        cat = lambda name, dtype: np.concatenate([np.zeros(0, dtype)] + [getattr(p, name) for p in parts])  # noqa: E731
        return Flat(
            cat("ids", np.int32),
            cat("segment_lengths", np.int64),
            cat("segment_counts", np.int64),
            cat("is_tuple", bool),
            cat("truncated", bool),
            [w for p in parts for w in p.word_starts],
        )


@dataclass
class TextTokenizer:
    """A fast (Rust) tokenizer that returns unpadded id arrays and reports truncation.

    ``lowercase`` mirrors sentence-transformers' ``do_lower_case``; texts are stripped
    of surrounding whitespace first, as sentence-transformers does.
    """

    backend: Tokenizer
    pad_id: int
    lowercase: bool = False

    @classmethod
    def from_hf(cls, hf_tokenizer, lowercase: bool = False) -> TextTokenizer:
        backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        return cls(backend, int(hf_tokenizer.pad_token_id or 0), lowercase)

    def __call__(self, texts: Sequence[str], max_length: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Token ids per text (special tokens included, at most ``max_length``) and a truncated flag."""
        encoded = self.encode_examples(list(texts), max_length)
        return encoded.ids, encoded.truncated

    def encode_examples(self, texts: Sequence, max_length: int) -> Encoded:
        """Every example's token ids, each kind of text (see the module) tokenized as it needs;
        a segment, a joined pair or a word list is cut at ``max_length`` tokens."""
        flat = self.encode_flat(texts, max_length)
        segments = np.split(flat.ids, np.cumsum(flat.segment_lengths)[:-1]) if len(flat.segment_lengths) else []
        bounds = np.concatenate([[0], np.cumsum(flat.segment_counts)])
        ids = [
            tuple(segments[a:b]) if tup else segments[a]
            for a, b, tup in zip(bounds[:-1].tolist(), bounds[1:].tolist(), flat.is_tuple.tolist())
        ]
        return Encoded(ids, flat.word_starts, flat.truncated)

    def encode_flat(self, texts: Sequence, max_length: int) -> Flat:
        """:meth:`encode_examples` as flat arrays (no array per example): what the token store appends."""
        parts, run = [], 0
        for i in range(1, len(texts) + 1):  # runs of one kind of text, in order
            if i == len(texts) or type(texts[i]) is not type(texts[run]):
                parts.append(self._encode_run(texts[run:i], type(texts[run]), max_length))
                run = i
        return Flat.join(parts)

    def _encode_run(self, texts: Sequence, kind: type, max_length: int) -> Flat:
        if kind is Segments:  # (examples may have different numbers of segments: retrieval's negatives)
            counts = np.fromiter(map(len, texts), np.int64, len(texts))
            flat = self._encode_run([s for t in texts for s in t], str, max_length)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            cut = np.logical_or.reduceat(flat.truncated, starts) if len(flat.truncated) else flat.truncated
            return Flat(flat.ids, flat.segment_lengths, counts, np.ones(len(texts), bool), cut, [None] * len(texts))
        lists, truncated, starts = [], [], []
        for k, encodings in enumerate(self._encode_chunks(list(texts), kind, max_length)):
            for j, e in enumerate(encodings):
                lists.append(e.ids)
                truncated.append(bool(e.overflowing))
                if kind is Words:
                    at, cut = word_starts(e.word_ids, len(texts[k * ENCODE_CHUNK + j]))
                    starts.append(at)
                    truncated[-1] |= cut
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))
        ids = np.fromiter(itertools.chain.from_iterable(lists), np.int32, int(lengths.sum()))
        n = len(lists)
        return Flat(
            ids, lengths, np.ones(n, np.int64), np.zeros(n, bool), np.array(truncated, bool), starts or [None] * n
        )

    def _encode_chunks(self, texts: list, kind: type, max_length: int):
        """:meth:`_encode` a chunk at a time: the tokenizer's Encoding objects (tokens, offsets, masks:
        several times the ids' memory) live for one chunk, not for every text of a large split."""
        for start in range(0, len(texts), ENCODE_CHUNK):
            yield self._encode(texts[start : start + ENCODE_CHUNK], kind, max_length)

    def _encode(self, texts: list, kind: type, max_length: int):
        clean = (lambda t: t.strip().lower()) if self.lowercase else str.strip
        self.backend.enable_truncation(max_length)
        if kind is Joined:
            return self.backend.encode_batch([(clean(a), clean(b)) for a, b in texts])
        if kind is Words:
            words = [[clean(w) or "-" for w in t] for t in texts]  # an empty word would vanish and shift the tags
            return self.backend.encode_batch(words, is_pretokenized=True)
        return self.backend.encode_batch([clean(t) for t in texts])


def word_starts(word_ids: Sequence[int | None], words: int) -> tuple[np.ndarray, bool]:
    """The token where each word starts (its first sub-token) and whether words were cut off;
    a word past the truncation has no token."""
    starts = np.full(words, -1, np.int64)
    previous = None
    for position, w in enumerate(word_ids):
        if w is not None and w != previous:
            starts[w] = position
        previous = w
    return starts, bool((starts < 0).any())
