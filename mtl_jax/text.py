"""Tokenization and length buckets shared by encoding, training and prediction.

Every batch is padded to one of a few fixed lengths (and, where the caller asks,
to a fixed number of rows), so the number of compiled shapes is bounded by the
number of buckets whatever the input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from mtl_jax.errors import MtlError

# Training: roughly geometric (x1.5), few shapes, since each costs a forward+backward compile.
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Inference (encode / predict): the row lengths of packed rows (mtl_jax.packing); a forward
# compiles fast, so fine steps cost little and leave little free space behind a long sentence.
INFERENCE_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_lengths(max_length: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    """The bucket lengths usable with ``max_length`` (which is always the last one)."""
    return tuple(b for b in buckets if b < max_length) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket that holds ``length`` tokens."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def check_texts(sentences, what: str = "sentences") -> list[str]:
    """A list of strings, or an error that names the first bad item's index."""
    if isinstance(sentences, str):
        return [sentences]
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise MtlError(f"{what}[{i}] is {type(s).__name__}, not str")
    return out


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
        texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
        self.backend.enable_truncation(max_length)
        encodings = self.backend.encode_batch(texts)
        ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return ids, truncated


def pad_batch(seqs: Sequence[np.ndarray], length: int, rows: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack ``seqs`` into ``ids [rows, length]`` and ``mask [rows, length]`` (int32); extra rows are all padding."""
    ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return ids, mask
