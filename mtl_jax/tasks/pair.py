"""``pair_classification``: a label per sentence pair (NLI, paraphrase).

``encoding: bi`` (default) encodes the two sentences separately, as sentence-transformers'
classification objective does: a softmax over ``(u, v, |u - v|)`` of their pooled embeddings.
``encoding: cross`` encodes the pair as one sequence, ``[CLS] a [SEP] b [SEP]``, and classifies its
pooled embedding. The encoder has no token-type embedding (a BERT checkpoint's row 0 is folded
into the positions), so the ``[SEP]`` between them is what marks the second sentence.

:class:`PairText` is the part every pair type shares: which columns, what text a row makes;
:class:`PairInput` adds prediction on pairs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mtl_jax.data.text import Joined, Segments
from mtl_jax.errors import MtlError
from mtl_jax.tasks.base import Features, HeadSpec, check_text, dense_head, next_slot, register
from mtl_jax.tasks.classification import Classification

ENCODINGS = ("bi", "cross")


class PairText:
    """Two (or more) text columns per example, encoded separately (``bi``) or joined (``cross``)."""

    roles = ("a", "b")  # what text_columns name, in order

    def check_pair(self) -> None:
        cols = self.config.text_columns
        if not cols or len(cols) != len(self.roles):
            raise MtlError(
                f"task {self.name} ({self.type}): text_columns must name {len(self.roles)} columns "
                f"({', '.join(self.roles)}), got {cols}"
            )
        if self.config.encoding not in ENCODINGS:
            raise MtlError(f"task {self.name}: unknown encoding {self.config.encoding!r} (bi, cross)")

    @property
    def segments(self) -> int:
        return len(self.text_columns()) if self.config.encoding == "bi" else 1

    @property
    def text_kind(self) -> str:
        return self.config.encoding

    def text_columns(self) -> tuple[str, ...]:
        return tuple(self.config.text_columns or ())

    def text(self, fields: dict):
        texts = [check_text(fields.get(c), c) for c in self.text_columns()]
        bad = [t for t in texts if type(t) is not str]
        if bad:
            return bad[0]
        return (Segments if self.config.encoding == "bi" else Joined)(texts)

    def head_options(self) -> tuple:
        return (("encoding", self.config.encoding),)


class PairInput(PairText):
    """A pair type whose ``predict`` takes pairs ``(a, b)`` (retrieval, a pair type too, takes sentences)."""

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(self.roles)
            and all(isinstance(v, str) for v in value)
        )

    def input_text(self, value):
        return (Segments if self.config.encoding == "bi" else Joined)(value)


def pair_features(features: Features) -> jnp.ndarray:
    """``[R, S, 3D]``: ``(u, v, |u - v|)`` at each pair's first slot (u there, v in the next slot)."""
    u = features.dropped
    v = next_slot(u)
    return jnp.concatenate([u, v, jnp.abs(u - v)], axis=-1)


@register("pair_classification")
@dataclasses.dataclass(frozen=True)
class PairClassification(PairInput, Classification):
    def __post_init__(self):
        super().__post_init__()
        self.check_pair()

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        if spec.option("encoding") == "cross":
            return Classification.head(spec, features)
        return dense_head(spec, pair_features(features))
