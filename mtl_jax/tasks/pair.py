"""``pair_classification``: a label per sentence pair (NLI, paraphrase).

``encoding: bi`` (default) encodes the two sentences separately, as sentence-transformers'
classification objective does: a softmax over ``(u, v, |u - v|)`` of their pooled embeddings.
``encoding: cross`` encodes the pair as one sequence, ``[CLS] a [SEP] b [SEP]``, and classifies its
pooled embedding; a BERT checkpoint's token-type embedding marks the second text, as in BERT
(``mtl_jax.model.encoder.token_types``).

:class:`PairText` is the part every pair type shares: which columns, what text a row makes;
:class:`PairInput` adds prediction on pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from mtl_jax.data.text import Joined, Segments
from mtl_jax.errors import MtlError
from mtl_jax.model.heads import Features, HeadSpec, dense_head, next_slot
from mtl_jax.options import names, option
from mtl_jax.tasks.base import PromptOptions, check_text, register
from mtl_jax.tasks.classification import Classification, ClassificationOptions

ENCODINGS = ("bi", "cross")


@dataclasses.dataclass(frozen=True)
class PairOptions(PromptOptions):
    text_columns: Optional[tuple[str, ...]] = option(None, "the columns of an example's texts, in order", parse=names)
    encoding: str = option("bi", "bi: each text encoded apart; cross: one sequence, [CLS] a [SEP] b [SEP]")


@dataclasses.dataclass(frozen=True)
class PairClassificationOptions(PairOptions, ClassificationOptions):
    normalize: bool = option(
        True,
        "bi: the head reads unit embeddings where the checkpoint normalises them (sentence-transformers' "
        "SoftmaxLoss); false: the pooled embeddings as they are",
    )


class PairText:
    """Two (or more) text columns per example, encoded separately (``bi``) or joined (``cross``)."""

    roles = ("a", "b")  # what text_columns name, in order

    def check_pair(self) -> None:
        cols = self.options.text_columns
        if not cols or len(cols) != len(self.roles):
            raise MtlError(
                f"task {self.name} ({self.type}): text_columns must name {len(self.roles)} columns "
                f"({', '.join(self.roles)}), got {cols}"
            )
        if self.options.encoding not in ENCODINGS:
            raise MtlError(f"task {self.name}: unknown encoding {self.options.encoding!r} (bi, cross)")

    @property
    def segments(self) -> int:
        return len(self.text_columns()) if self.options.encoding == "bi" else 1

    @property
    def text_kind(self) -> str:
        return self.options.encoding

    def text_columns(self) -> tuple[str, ...]:
        return tuple(self.options.text_columns or ())

    def text(self, fields: dict):
        texts = [self.prompted(check_text(fields.get(c), c), c) for c in self.text_columns()]
        bad = [t for t in texts if type(t) is not str]
        if bad:
            return bad[0]
        return (Segments if self.options.encoding == "bi" else Joined)(texts)

    def head_options(self) -> tuple:
        return (("encoding", self.options.encoding),)


class PairInput(PairText):
    """A pair type whose ``predict`` takes pairs ``(a, b)`` (retrieval, a pair type too, takes sentences)."""

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(self.roles)
            and all(isinstance(v, str) for v in value)
        )

    def input_text(self, value):
        texts = [self.prompted(v, c) for v, c in zip(value, self.text_columns())]
        return (Segments if self.options.encoding == "bi" else Joined)(texts)


def pair_features(features: Features, normalize: bool = True) -> jnp.ndarray:
    """``[R, S, 3D]``: ``(u, v, |u - v|)`` at each pair's first slot (u there, v in the next slot); with
    ``normalize``, of unit embeddings where the checkpoint normalises them (as sentence-transformers'
    SoftmaxLoss reads the model's output), the head dropout scaled alike."""
    u = features.dropped
    if normalize and features.scales is not None:
        u = u * features.scales
    v = next_slot(u)
    return jnp.concatenate([u, v, jnp.abs(u - v)], axis=-1)


@register("pair_classification")
@dataclasses.dataclass(frozen=True)
class PairClassification(PairInput, Classification):
    Options = PairClassificationOptions

    def __post_init__(self):
        super().__post_init__()
        self.check_pair()

    def head_options(self) -> tuple:
        return super().head_options() + (("normalize", self.options.normalize),)

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        if spec.option("encoding") == "cross":
            return Classification.head(spec, features)
        return dense_head(spec, pair_features(features, spec.option("normalize")))
