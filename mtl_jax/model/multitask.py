"""The multi-task model: the shared encoder, pooling, and one Dense head per task.

``MultiTaskModel`` returns every task's logits and the pooled sentence embedding from
one forward pass. Its parameters are ``{"encoder": <FlaxDistilBertModule's tree>,
"heads": {task: {"kernel", "bias"}}}``; pretrained encoder weights go into
``params["encoder"]`` and the heads start fresh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.errors import MtlError
from mtl_jax.model.encoder import ATTENTION, Encoder
from mtl_jax.model.heads import Features, as_head, inverse_norm
from mtl_jax.model.lora import add_adapters
from mtl_jax.model.pretrained import POOLING_MODES


def segment_members(segments: jax.Array, num_segments: int) -> jax.Array:
    """``[B, L, S]`` bool: token l of row b belongs to the row's sentence s (``segments`` numbers them 1..S)."""
    return segments[..., None] == jnp.arange(1, num_segments + 1)


def pool_segments(hidden: jax.Array, segments: jax.Array, mode: str, num_segments: int) -> jax.Array:
    """Sentence embeddings [B, S, D] (float32) from token states [B, L, D], for mean or max pooling.

    ``segments`` [B, L] numbers the sentences of a row 1..S (0 = padding). Padding never
    contributes: ``mean`` averages a sentence's own tokens (as sentence-transformers does),
    ``max`` ignores every other position. (cls pooling never needs the other tokens' last
    states: ``MultiTaskModel.embed_packed`` asks the encoder for the first tokens' alone.)
    """
    hidden = hidden.astype(jnp.float32)
    member = segment_members(segments, num_segments).astype(jnp.float32)  # [B, L, S]
    if mode == "mean":
        return jnp.einsum("bls,bld->bsd", member, hidden) / jnp.maximum(member.sum(axis=1)[..., None], 1e-9)
    if mode == "max":
        return jnp.where(member[..., None] > 0, hidden[:, :, None, :], -1e9).max(axis=1)
    raise ValueError(f"unknown pooling {mode!r} for pool_segments; choose mean or max")


class Heads(nn.Module):
    """Each task's head, named after the task: what it is (a Dense layer over the pooled embedding,
    over a pair's features, over token states, or no parameters at all) is its type's
    :meth:`~mtl_jax.tasks.Task.head`."""

    tasks: tuple  # HeadSpec, or (name, number of classes) for classification

    @nn.compact
    def __call__(self, features: Features) -> dict[str, jax.Array]:
        return {h.name: h.build(h, features) for h in map(as_head, self.tasks)}


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """``float32`` | ``bfloat16`` -> the jnp dtype the encoder computes in (parameters stay float32)."""
    if name not in COMPUTE_DTYPES:
        raise MtlError(f"dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


class MultiTaskModel(nn.Module):
    """Encoder -> pooling -> dropout -> a Dense head per task.

    ``embed`` / ``embed_packed`` and ``classify`` are the two halves of ``__call__``: the
    trainer's cached path runs ``classify`` alone on stored embeddings of a frozen encoder,
    and ``tasks=()`` is a plain sentence encoder.
    """

    config: Any  # transformers.DistilBertConfig
    tasks: tuple = (("task_a", 3), ("task_b", 2))  # HeadSpec per task (a (name, classes) pair: classification)
    pooling: str = "mean"
    head_dropout: float = 0.1
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    attention: str = "auto"  # auto | fused | xla: see mtl_jax.model.encoder.Attention
    normalize: bool = False  # the checkpoint normalises its embeddings: heads that follow it read the norms
    pairs: bool | None = None  # inputs may be cross-encoded pairs (BERT's token types); None: a task's encoding says

    def setup(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose from {POOLING_MODES}")
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; choose from {ATTENTION}")
        self.encoder = Encoder(self.config, self.dtype, self.attention, self.cross_encoded)
        if self.guided:  # the starting encoder, never trained (params["guide"]: see init_params)
            self.guide = Encoder(self.config, self.dtype, self.attention, self.cross_encoded)
        if self.tasks:
            self.dropout = nn.Dropout(self.head_dropout)
            self.heads = Heads(self.tasks)

    @property
    def token_heads(self) -> bool:
        return any(as_head(h).tokens for h in self.tasks)

    @property
    def cross_encoded(self) -> bool:
        """Some input is a pair encoded as one sequence (its second text gets BERT's token type 1)."""
        if self.pairs is not None:
            return self.pairs
        return any(as_head(h).option("encoding") == "cross" for h in self.tasks)

    @property
    def guided(self) -> bool:
        """A head reads the starting encoder's embeddings (a retrieval task with ``guide: initial``)."""
        return any(as_head(h).option("guide") == "initial" for h in self.tasks)

    def guide_packed(self, ids, positions, segments, num_segments: int) -> jax.Array:
        """The starting encoder's pooled embeddings ``[R, S, D]`` float32 of packed rows (no dropout, no gradient)."""
        pooled, _ = self._pooled(self.guide, ids, positions, segments, num_segments, True, False)
        return jax.lax.stop_gradient(pooled)

    def encode_packed(self, ids, positions, segments, num_segments: int, deterministic: bool, tokens: bool = False):
        """``(pooled [R, S, D] float32, token states [R, P, D] or None)`` of rows holding up to S
        sentences (see ``mtl_jax.model.encoder``); the token states only when ``tokens``.

        ``cls`` takes each sentence's first token, whose state alone the last layer computes
        (unless the token states are wanted).
        """
        return self._pooled(self.encoder, ids, positions, segments, num_segments, deterministic, tokens)

    def _pooled(self, encoder, ids, positions, segments, num_segments: int, deterministic: bool, tokens: bool):
        if self.pooling == "cls":
            first = (positions == 0)[..., None] & segment_members(segments, num_segments)  # [R, P, S]
            starts = jnp.argmax(first, axis=1)  # [R, S] a sentence's first token; 0 for an empty slot (never read)
            if not tokens:
                return encoder(ids, positions, segments, deterministic, starts).astype(jnp.float32), None
        hidden = encoder(ids, positions, segments, deterministic)
        if self.pooling == "cls":
            pooled = jnp.take_along_axis(hidden, starts[..., None], axis=1).astype(jnp.float32)
        else:
            pooled = pool_segments(hidden, segments, self.pooling, num_segments)
        return pooled, (hidden if tokens else None)

    def embed_packed(self, ids, positions, segments, num_segments: int, deterministic: bool = True) -> jax.Array:
        """Sentence embeddings ``[R, S, D]`` float32 of packed rows (see :meth:`encode_packed`)."""
        return self.encode_packed(ids, positions, segments, num_segments, deterministic)[0]

    def embed(self, input_ids, attention_mask, deterministic: bool = True) -> jax.Array:
        """Pooled sentence embedding [B, D] float32: one sentence per row, padded at the end."""
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self.embed_packed(input_ids, positions, attention_mask, 1, deterministic)[:, 0]

    def classify_packed(
        self, ids, positions, segments, num_segments: int, deterministic: bool = True, encoder_deterministic=None
    ) -> dict[str, jax.Array]:
        """{task: outputs [R, S, ...] per slot, or [R, P, ...] per token}: packed rows (see
        ``encode_packed``); empty slots give finite outputs nobody reads. ``encoder_deterministic`` as in ``__call__``."""
        enc_det = deterministic if encoder_deterministic is None else encoder_deterministic
        pooled, hidden = self.encode_packed(ids, positions, segments, num_segments, enc_det, self.token_heads)
        guided = self.guided and self.has_variable("params", "guide")  # (an export keeps no starting encoder)
        guide = self.guide_packed(ids, positions, segments, num_segments) if guided else None
        return self.classify(pooled, deterministic, hidden, guide)

    def classify(self, pooled: jax.Array, deterministic: bool = True, hidden=None, guide=None) -> dict[str, jax.Array]:
        """{task: outputs} float32 from pooled embeddings ``[R, S, D]`` (and token states ``[R, P, D]``,
        the starting encoder's embeddings ``[R, S, D]``: without them a guided head reads ``pooled``)."""
        dropped = self.dropout(pooled, deterministic=deterministic)
        tokens = None if hidden is None else self.dropout(hidden.astype(jnp.float32), deterministic=deterministic)
        scales = inverse_norm(pooled) if self.normalize else None
        guide = pooled if guide is None and self.guided else guide
        return self.heads(Features(pooled, dropped, tokens, scales, guide))

    def __call__(
        self, input_ids, attention_mask, deterministic: bool = True, encoder_deterministic: bool | None = None
    ):
        """``(logits, pooled)`` of one sentence per row: per task ``[B, ...]``; ``encoder_deterministic``
        turns the encoder's dropout off on its own (a frozen encoder runs as a fixed feature extractor)."""
        enc_det = deterministic if encoder_deterministic is None else encoder_deterministic
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        pooled, hidden = self.encode_packed(input_ids, positions, attention_mask, 1, enc_det, self.token_heads)
        if not self.tasks:
            return {}, pooled[:, 0]
        out = self.classify(pooled, deterministic, hidden)
        return {h.name: out[h.name] if h.tokens else out[h.name][:, 0] for h in map(as_head, self.tasks)}, pooled[:, 0]


def init_params(model: MultiTaskModel, encoder_params, rng: jax.Array, max_length: int = 16) -> dict:
    """Fresh heads, and the given pretrained encoder parameters under ``"encoder"``."""
    ids = jnp.zeros((1, max_length), jnp.int32)
    shapes = jax.eval_shape(model.init, rng, ids, ids)["params"]
    params = {"encoder": add_adapters(encoder_params, shapes["encoder"], jax.random.fold_in(rng, 7))}
    if "heads" in shapes:
        zeros = jnp.zeros((1, 1, model.config.dim), jnp.float32)
        features = Features(zeros, zeros, zeros if model.token_heads else None, guide=zeros if model.guided else None)
        params["heads"] = jax.jit(Heads(model.tasks).init)(rng, features).get("params", {})
    same_shape = jax.tree.map(lambda a, b: a.shape == b.shape, shapes, params)
    if not all(jax.tree.leaves(same_shape)):
        raise ValueError("encoder parameters do not match the model's config")
    if model.guided:  # the starting encoder, a copy (the train state's buffers are donated one by one)
        params["guide"] = jax.tree.map(jnp.array, params["encoder"])
    return params
