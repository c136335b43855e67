"""Tokenization shared by encoding, training and prediction: unpadded token ids per text
(``mtl_jax.data.packing`` lays them out in rows).

An example's text is a string (one sentence), or one of the kinds below: :class:`Segments`
(texts encoded separately, each its own segment of a packed row: a bi-encoder pair),
:class:`Joined` (texts encoded as one sequence, ``[CLS] a [SEP] b [SEP]``: a cross-encoder pair)
or :class:`Words` (pre-split words: a tagging example, labelled on each word's first sub-token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mtl_jax.errors import MtlError


def check_texts(sentences, what: str = "sentences") -> list[str]:
    """A list of strings, or an error that names the first bad item's index."""
    if isinstance(sentences, str):
        return [sentences]
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise MtlError(f"{what}[{i}] is {type(s).__name__}, not str")
    return out


ENCODE_CHUNK = 8192  # texts per encode_batch call


class Segments(tuple):
    """Texts of one example that are encoded separately (each gets its own embedding)."""


class Joined(tuple):
    """Texts of one example encoded as one sequence: ``[CLS] a [SEP] b [SEP]``."""


class Words(tuple):
    """The words of one example, pre-split (tagging)."""


@dataclass
class Encoded:
    """Token ids per example (an array, or a tuple of arrays for :class:`Segments`), the token
    where each word starts (:class:`Words` only, else ``None``) and which examples were cut."""

    ids: list
    word_starts: list
    truncated: np.ndarray  # [N] bool


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
        ids, truncated = [], []
        for encodings in self._encode_chunks(list(texts), str, max_length):
            ids += [np.asarray(e.ids, dtype=np.int32) for e in encodings]
            truncated += [bool(e.overflowing) for e in encodings]
        return ids, np.array(truncated, dtype=bool)

    def encode_examples(self, texts: Sequence, max_length: int) -> Encoded:
        """Every example's token ids, each kind of text (see the module) tokenized as it needs;
        a segment, a joined pair or a word list is cut at ``max_length`` tokens."""
        ids: list = [None] * len(texts)
        starts: list = [None] * len(texts)
        truncated = np.zeros(len(texts), bool)
        kinds: dict[type, list[int]] = {}
        for i, t in enumerate(texts):
            kinds.setdefault(type(t), []).append(i)
        for kind, members in kinds.items():
            if kind is Segments:  # (examples may have different numbers of segments: retrieval's negatives)
                flat, cut = self([s for i in members for s in texts[i]], max_length)
                at = 0
                for i in members:
                    width = len(texts[i])
                    ids[i], truncated[i] = tuple(flat[at : at + width]), cut[at : at + width].any()
                    at += width
                continue
            done = 0
            for encodings in self._encode_chunks([texts[i] for i in members], kind, max_length):
                for k, e in enumerate(encodings, start=done):
                    i = members[k]
                    ids[i] = np.asarray(e.ids, dtype=np.int32)
                    truncated[i] = bool(e.overflowing)
                    if kind is Words:
                        starts[i], cut = word_starts(e.word_ids, len(texts[i]))
                        truncated[i] |= cut
                done += len(encodings)
        return Encoded(ids, starts, truncated)

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
