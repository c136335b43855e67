"""The shared encoder with pooling and one Dense head per task, and ``SentenceEncoder``.

``MultiTaskModel`` returns every task's logits and the pooled sentence embedding from
one forward pass. Its parameters are ``{"encoder": <FlaxDistilBertModule params>,
"heads": {task: {"kernel", "bias"}}}``; pretrained encoder weights go into
``params["encoder"]`` and the heads start fresh.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.errors import MtlError
from mtl_jax.pretrained import POOLING_MODES, EncoderSpec, load_pretrained
from mtl_jax.packing import MAX_SEGMENTS, packed_calls, packed_hidden
from mtl_jax.text import TextTokenizer, check_texts


def segment_members(segments: jax.Array, num_segments: int) -> jax.Array:
    """``[B, L, S]`` bool: token l of row b belongs to the row's sentence s (``segments`` numbers them 1..S)."""
    return segments[..., None] == jnp.arange(1, num_segments + 1)


def pool_segments(hidden: jax.Array, segments: jax.Array, mode: str, num_segments: int) -> jax.Array:
    """Sentence embeddings [B, S, D] (float32) from token states [B, L, D], for mean or max pooling.

    ``segments`` [B, L] numbers the sentences of a row 1..S (0 = padding). Padding never
    contributes: ``mean`` averages a sentence's own tokens (as sentence-transformers does),
    ``max`` ignores every other position. (cls pooling never needs the other tokens' last
    states: ``pooled_rows`` asks the encoder for the first tokens' alone.)
    """
    hidden = hidden.astype(jnp.float32)
    member = segment_members(segments, num_segments).astype(jnp.float32)  # [B, L, S]
    if mode == "mean":
        return jnp.einsum("bls,bld->bsd", member, hidden) / jnp.maximum(member.sum(axis=1)[..., None], 1e-9)
    if mode == "max":
        return jnp.where(member[..., None] > 0, hidden[:, :, None, :], -1e9).max(axis=1)
    raise ValueError(f"unknown pooling {mode!r} for pool_segments; choose mean or max")


def pooled_rows(encoder: FlaxDistilBertModule, ids: jax.Array, positions: jax.Array, segments: jax.Array, mode: str,
                num_segments: int, deterministic: bool = True) -> jax.Array:
    """Sentence embeddings [R, S, D] float32 of rows holding up to S sentences (``packing.packed_hidden``'s
    inputs). ``cls`` takes each sentence's first token, whose state alone the last layer computes."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling {mode!r}; choose from {POOLING_MODES}")
    if mode == "cls":
        first = (positions == 0)[..., None] & segment_members(segments, num_segments)  # [R, P, S]
        queries = jnp.argmax(first, axis=1)  # a sentence's first token; 0 for an empty slot (never read)
        return packed_hidden(encoder, ids, positions, segments, deterministic, queries).astype(jnp.float32)
    return pool_segments(packed_hidden(encoder, ids, positions, segments, deterministic), segments, mode, num_segments)


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Heads(nn.Module):
    """One ``nn.Dense(num_classes)`` per task, named after the task."""

    tasks: tuple[tuple[str, int], ...]  # (name, number of classes)

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        return {name: nn.Dense(n, name=name)(x) for name, n in self.tasks}


class MultiTaskModel(nn.Module):
    """DistilBERT encoder -> masked pooling -> dropout -> a Dense head per task.

    ``embed`` and ``classify`` are the two halves of ``__call__``: the trainer's cached
    path runs ``classify`` alone on stored embeddings of a frozen encoder.
    """

    config: Any  # transformers.DistilBertConfig
    tasks: tuple[tuple[str, int], ...] = (("task_a", 3), ("task_b", 2))
    pooling: str = "mean"
    head_dropout: float = 0.1
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32

    def setup(self):
        self.encoder = FlaxDistilBertModule(self.config, dtype=self.dtype)
        if self.tasks:
            self.dropout = nn.Dropout(self.head_dropout)
            self.heads = Heads(self.tasks)

    def embed(self, input_ids, attention_mask, deterministic: bool = True) -> jax.Array:
        """Pooled sentence embedding [B, D] float32: one sentence per row, padded at the end."""
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return pooled_rows(self.encoder, input_ids, positions, attention_mask, self.pooling, 1, deterministic)[:, 0]

    def classify(self, pooled: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        """{task: logits [B, C_task]} float32 from pooled embeddings."""
        return self.heads(self.dropout(pooled, deterministic=deterministic))

    def __call__(self, input_ids, attention_mask, deterministic: bool = True, encoder_deterministic: bool | None = None):
        """``(logits, pooled)``; ``encoder_deterministic`` turns the encoder's dropout off on its own
        (a frozen encoder runs as a fixed feature extractor)."""
        enc_det = deterministic if encoder_deterministic is None else encoder_deterministic
        pooled = self.embed(input_ids, attention_mask, enc_det)
        if not self.tasks:
            return {}, pooled
        return self.classify(pooled, deterministic), pooled


def init_params(model: MultiTaskModel, encoder_params, rng: jax.Array, max_length: int = 16) -> dict:
    """Fresh heads, and the given pretrained encoder parameters under ``"encoder"``."""
    ids = jnp.zeros((1, max_length), jnp.int32)
    shapes = jax.eval_shape(model.init, rng, ids, ids)["params"]
    params = {"encoder": encoder_params}
    if "heads" in shapes:
        heads = Heads(model.tasks)
        params["heads"] = jax.jit(heads.init)(rng, jnp.zeros((1, model.config.dim), jnp.float32))["params"]
    same_shape = jax.tree.map(lambda a, b: a.shape == b.shape, shapes, params)
    if not all(jax.tree.leaves(same_shape)):
        raise ValueError("encoder parameters do not match the model's config")
    return params


@dataclass
class SentenceEncoder:
    """A pretrained encoder ready to embed sentences: config + params, tokenizer, pooling."""

    spec: EncoderSpec
    params: Any  # FlaxDistilBertModule params
    hf_tokenizer: Any  # transformers PreTrainedTokenizerFast
    source: Path | None = None
    _tokenizer: TextTokenizer = field(init=False, repr=False)

    def __post_init__(self):
        self._tokenizer = TextTokenizer.from_hf(self.hf_tokenizer, lowercase=self.spec.lowercase)

    @property
    def config(self):
        return self.spec.config

    @property
    def dim(self) -> int:
        return self.spec.config.dim

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @functools.cached_property
    def _embed_fn(self):
        @functools.partial(jax.jit, static_argnames=("pooling", "normalize"))
        def embed(params, ids, positions, segments, pooling, normalize):
            pooled = embed_packed(self.config, params, ids, positions, segments, pooling)
            return l2_normalize(pooled) if normalize else pooled

        return embed

    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 64,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Embeddings ``[N, D]`` float32, rows in input order.

        Pooling, normalization and ``max_length`` default to the checkpoint's settings.
        ``batch_size`` sets the work per compiled call: about ``batch_size`` × 24 tokens
        (sentences are packed several to a row, see ``mtl_jax.packing``).
        """
        pooling = pooling or self.spec.pooling
        if pooling not in POOLING_MODES:
            raise MtlError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
        normalize = self.spec.normalize if normalize is None else normalize
        fn = functools.partial(self._embed_fn, self.params, pooling=pooling, normalize=normalize)
        out = self.map_packed(fn, sentences, batch_size=batch_size, max_length=max_length, progress=progress, empty=np.zeros((0, self.dim), np.float32))
        return out.astype(np.float32, copy=False)

    def map_packed(self, fn, sentences: Sequence[str], batch_size: int = 64, max_length: int | None = None,
                   progress: bool | None = None, empty=None):
        """``fn(ids, positions, segments) -> pytree of [R, MAX_SEGMENTS, ...]`` over all sentences,
        packed several to a row (``mtl_jax.packing``); one output row per sentence, in input order.

        One input compiles at most ``len(packing.row_lengths(max_length))`` shapes (inputs of
        only a few rows use fewer rows per call, a power of two).
        ``progress=None`` shows a bar only on a terminal for long inputs.
        """
        texts = check_texts(sentences)
        max_length = max_length or self.spec.max_length
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise MtlError(f"max_length {max_length} must be in [2, {self.config.max_position_embeddings}]")
        if batch_size < 1:
            raise MtlError(f"batch_size must be positive, got {batch_size}")
        if not texts and empty is not None:
            return empty
        ids, _ = self._tokenizer(texts, max_length)
        if progress is None:
            progress = sys.stderr.isatty() and len(texts) >= 10 * batch_size
        out = None
        pending = []

        def collect(call, result):
            nonlocal out
            result = jax.tree.map(lambda r: np.asarray(r).reshape((-1,) + r.shape[2:]), result)
            if out is None:
                out = jax.tree.map(lambda r: np.zeros((len(texts),) + r.shape[1:], r.dtype), result)
            slots = np.flatnonzero(call.index >= 0)
            jax.tree.map(lambda o, r: o.__setitem__(call.index[slots], r[slots]), out, result)

        with tqdm(total=len(texts), unit="sent", disable=not progress, desc="encode") as bar:
            for call in packed_calls(ids, max_length, batch_size, self._tokenizer.pad_id):
                pending.append((call, fn(call.ids, call.positions, call.segments)))
                if len(pending) > 2:  # keep the device busy while the host packs the next call
                    collect(*pending.pop(0))
                bar.update(call.sentences)
            for item in pending:
                collect(*item)
        return out


def embed_packed(config, params, ids, positions, segments, pooling: str) -> jax.Array:
    """Pooled embeddings ``[R, MAX_SEGMENTS, D]`` float32 of packed rows (no normalization)."""
    return pooled_rows(FlaxDistilBertModule(config).bind({"params": params}), ids, positions, segments, pooling, MAX_SEGMENTS)


def load_encoder(name_or_path: str | Path = "sentence-transformers/all-MiniLM-L6-v2", allow_pickle: bool = False) -> SentenceEncoder:
    """A :class:`SentenceEncoder` for the embedded model, a local checkpoint directory, or a hub name."""
    spec, params, tokenizer, folder = load_pretrained(name_or_path, allow_pickle=allow_pickle)
    return SentenceEncoder(spec, params, tokenizer, source=folder)
