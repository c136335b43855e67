"""Tokenization shared by encoding, training and prediction: unpadded token ids per text
(``mtl_jax.data.packing`` lays them out in rows)."""

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
