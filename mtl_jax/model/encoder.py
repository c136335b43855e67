"""The DistilBERT encoder as a Flax module over packed rows.

A row of tokens may hold several sentences: every token carries its position inside its
own sentence and a segment number (which sentence of the row it belongs to, 1..S; 0 is
padding). Attention is block-diagonal over segments, so a token sees only its own
sentence and a packed sentence gets the states it gets alone. A padded batch is the
special case ``segments = attention_mask``, ``positions = arange(L)``.

The parameter tree is exactly ``FlaxDistilBertModule``'s (``embeddings/...``,
``transformer/layer/<i>/{attention,sa_layer_norm,ffn,output_layer_norm}``), so converted
and exported checkpoints load unchanged; ``tests/test_encoder.py`` fails if it drifts. A
checkpoint converted from BERT adds ``type_offsets`` beside that tree: BERT's token-type rows 1..
as offsets from row 0, which the conversion folds into the positions (see :func:`token_types`).
The arithmetic is that module's too (its initialisers, LayerNorm epsilon, activation,
dtype handling), except that the softmax divides after the weighted sum, and dropout
draws its masks with :func:`keep_mask`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.random import threefry_2x32
from transformers.modeling_flax_utils import ACT2FN
from transformers.models.distilbert.modeling_flax_distilbert import positional_encoding

from mtl_jax.model.dense import Dense
from mtl_jax.model.lora import LoRADense, lora_of


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """Dropout's Bernoulli mask (True = keep) and its exact keep probability, from 16-bit draws.

    Each draw is half of a Threefry-2x32 output word in counter mode: the hash of counter
    ``(i, 0)`` gives two words, so the draws of elements ``4i`` to ``4i + 3`` (in row-major order),
    about a third of the random-bit cost of ``jax.random.bernoulli`` (one 64-bit hash per element).
    An element's draw depends on its index only, not on the shape's leading size, so a batch with
    more padding rows (a grid rounded up for more devices) gives its real rows the same mask. The
    drop probability is ``round(rate * 2**16) / 2**16``, within 8e-6 of ``rate``; the returned
    keep probability is that exact value.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    n = math.prod(shape)
    counters = jnp.arange(-(-n // 4), dtype=jnp.uint32)
    first, second = jnp.split(threefry_2x32(key, jnp.concatenate([counters, jnp.zeros_like(counters)])), 2)
    halves = [first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16]
    draws = jnp.stack(halves, axis=-1).reshape(-1)[:n].reshape(shape)
    threshold = round(rate * 65536)
    return draws >= threshold, 1.0 - threshold / 65536


class Dropout(nn.Module):
    """Inverted dropout with :func:`keep_mask`'s draws (rng stream ``dropout``)."""

    rate: float

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep, keep_prob = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


def _dense(config, dtype, features: int, target: str | None = None) -> nn.Module:
    """A dense layer; with a LoRA ``target`` (q, k, v, out, ffn) of the config's adapters (see mtl_jax.model.lora), adapted."""
    init = jax.nn.initializers.normal(config.initializer_range)
    lora = lora_of(config)
    if lora is not None and target in lora.targets:
        return LoRADense(features, lora, dtype, kernel_init=init)
    return Dense(features, dtype, kernel_init=init)


def _layer_norm(dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-12, dtype=dtype)


def token_types(ids: jax.Array, positions: jax.Array, sep_id: int) -> jax.Array:
    """``[R, P]`` int32 BERT token types of packed rows: 1 for the tokens after a sentence's first
    ``sep_id`` (the second text of a cross-encoded pair, ``[CLS] a [SEP] b [SEP]``), else 0.

    A tokenizer's pair template gives exactly these types; a single sentence's only separator is its
    last token, so all of it is type 0. (A text that itself contains the separator's literal text,
    ``[SEP]``, which the tokenizer turns into the separator, would get type 1 after it.)
    """
    is_sep = (ids == sep_id).astype(jnp.int32)
    before = jnp.cumsum(is_sep, axis=1) - is_sep  # [R, P] separators earlier in the row
    starts = jnp.arange(ids.shape[1]) - positions  # [R, P] where each token's sentence starts
    return (before - jnp.take_along_axis(before, starts, axis=1) > 0).astype(jnp.int32)


def type_count(config) -> int:
    """Rows of the checkpoint's token-type embedding (BERT's; 0: none, as in DistilBERT)."""
    return int(getattr(config, "type_vocab_size", 0) or 0)


class Embeddings(nn.Module):
    """Word + position embeddings, LayerNorm, dropout. Positions come from the caller (packed rows)."""

    config: Any  # transformers.DistilBertConfig
    dtype: Any = jnp.float32

    def setup(self):
        init = jax.nn.initializers.normal(self.config.initializer_range)
        self.word_embeddings = nn.Embed(self.config.vocab_size, self.config.dim, embedding_init=init)
        if not self.config.sinusoidal_pos_embds:
            self.position_embeddings = nn.Embed(
                self.config.max_position_embeddings, self.config.dim, embedding_init=init
            )
        self.LayerNorm = _layer_norm(self.dtype)
        self.dropout = Dropout(self.config.dropout)

    def __call__(self, ids: jax.Array, positions: jax.Array, deterministic: bool, offsets=None) -> jax.Array:
        """``offsets`` ``[R, P, D]``: added to each token before the LayerNorm (BERT's token types)."""
        if self.config.sinusoidal_pos_embds:  # a constant, not a parameter
            table = positional_encoding(self.config.max_position_embeddings, self.config.dim)[0]
            where = table[positions].astype(self.dtype)
        else:
            where = self.position_embeddings(positions)
        x = self.word_embeddings(ids) + where
        if offsets is not None:  # (zero where the type is 0: such a token's sum stays bit for bit)
            x = x + offsets
        return self.dropout(self.LayerNorm(x), deterministic)


ATTENTION = ("auto", "fused", "xla")


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array | None:
    """cuDNN's fused attention (``jax.nn.dot_product_attention``) of ``[R, L, H, D / H]`` heads, or
    None where it does not apply (no GPU or cuDNN, a dtype, head size or shape it rejects)."""
    try:
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation="cudnn")
    except Exception:  # noqa: BLE001 -- any rejection means: use the XLA path
        return None


class Attention(nn.Module):
    """Multi-head self-attention under an additive mask ``bias`` ``[R, 1, Q, P]``.

    ``impl``: ``xla`` is this module's own arithmetic (any backend, with attention
    dropout); ``fused`` asks for cuDNN's fused kernel and falls back to ``xla`` where it is
    rejected; ``auto`` is ``fused`` on a GPU in 16-bit when no attention dropout runs (the
    fused kernel has none), else ``xla``.
    """

    config: Any
    dtype: Any = jnp.float32
    impl: str = "auto"

    def setup(self):
        dim = self.config.dim
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (
            _dense(self.config, self.dtype, dim, target) for target in ("q", "k", "v", "out")
        )
        self.dropout = Dropout(self.config.attention_dropout)

    def __call__(self, queries: jax.Array, keys: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        """``queries`` ``[R, Q, D]`` attend to ``keys`` ``[R, P, D]`` (the states the keys and values come from)."""
        rows, dim, heads = keys.shape[0], self.config.dim, self.config.n_heads

        def split(t):  # [R, L, D] -> [R, L, H, D / H]
            return t.reshape(rows, -1, heads, dim // heads)

        q, k, v = split(self.q_lin(queries)), split(self.k_lin(keys)), split(self.v_lin(keys))
        context = fused_attention(q, k, v, bias) if self.use_fused(deterministic) else None
        if context is None:
            context = self.xla_attention(q, k, v, bias, deterministic)
        return self.out_lin(context.reshape(queries.shape))

    def use_fused(self, deterministic: bool) -> bool:
        if self.impl == "auto":
            no_dropout = deterministic or self.config.attention_dropout == 0.0
            return jax.default_backend() == "gpu" and self.dtype != jnp.float32 and no_dropout
        return self.impl == "fused"

    def xla_attention(self, q, k, v, bias, deterministic: bool) -> jax.Array:
        """Softmax attention with the division after the weighted sum ([Q, head dim] divisions
        instead of [Q, P]), and dropout on the unnormalized weights. ``[R, L, H, D / H]`` heads."""
        q = q / math.sqrt(q.shape[-1])
        scores = jnp.einsum("rqhd,rphd->rhqp", q, k) + bias  # [R, H, Q, P]
        unnormalized = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        total = unnormalized.sum(axis=-1, keepdims=True)
        context = jnp.einsum("rhqp,rphd->rhqd", self.dropout(unnormalized, deterministic), v) / total
        return context.transpose(0, 2, 1, 3)  # [R, Q, H, D / H]


class FFN(nn.Module):
    config: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.lin1 = _dense(self.config, self.dtype, self.config.hidden_dim, "ffn")
        self.lin2 = _dense(self.config, self.dtype, self.config.dim, "ffn")
        self.dropout = Dropout(self.config.dropout)

    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        return self.dropout(self.lin2(ACT2FN[self.config.activation](self.lin1(x))), deterministic)


class Block(nn.Module):
    """One post-LayerNorm transformer block."""

    config: Any
    dtype: Any = jnp.float32
    attention_impl: str = "auto"  # see Attention

    def setup(self):
        self.attention = Attention(self.config, self.dtype, self.attention_impl)
        self.sa_layer_norm = _layer_norm(self.dtype)
        self.ffn = FFN(self.config, self.dtype)
        self.output_layer_norm = _layer_norm(self.dtype)

    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool, queries: jax.Array | None = None):
        """States ``[R, P, D]`` -> ``[R, P, D]``, or ``[R, Q, D]`` for the token indices ``queries`` ``[R, Q]``."""
        states = x
        if queries is not None:
            x = jnp.take_along_axis(x, queries[..., None], axis=1)  # [R, Q, D]
            bias = jnp.take_along_axis(bias, queries[:, None, :, None], axis=2)  # [R, 1, Q, P]
        x = self.sa_layer_norm(self.attention(x, states, bias, deterministic) + x)
        return self.output_layer_norm(self.ffn(x, deterministic) + x)


class _Layers(nn.Module):
    """``transformer/layer/<i>``: the blocks, named as FlaxDistilBertModule names them."""

    config: Any
    dtype: Any = jnp.float32
    attention_impl: str = "auto"  # see Attention

    def setup(self):
        self.blocks = [
            Block(self.config, self.dtype, self.attention_impl, name=str(i)) for i in range(self.config.n_layers)
        ]

    def __call__(self, x, bias, deterministic: bool, queries=None):
        for i, block in enumerate(self.blocks):
            x = block(x, bias, deterministic, queries if i == len(self.blocks) - 1 else None)
        return x


class _Transformer(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    attention_impl: str = "auto"  # see Attention

    def setup(self):
        self.layer = _Layers(self.config, self.dtype, self.attention_impl)

    def __call__(self, x, bias, deterministic: bool, queries=None):
        return self.layer(x, bias, deterministic, queries)


class Encoder(nn.Module):
    """DistilBERT over packed rows: ``(ids, positions, segments) -> token states``.

    With ``queries`` (``[R, Q]`` token indices) the result is ``[R, Q, D]``, those tokens'
    states alone: the last layer computes only their queries, attention rows, output
    projection, LayerNorms and feed-forward (every token still gives its keys and values).
    For cls pooling that is the same function for a fraction of the last layer's cost.
    A padding token (segment 0) attends to no key; its state is finite and never read.
    """

    config: Any  # transformers.DistilBertConfig
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32
    attention_impl: str = "auto"  # see Attention
    # BERT's token types from the separators (:func:`token_types`); False: every token type 0, the
    # programs of single sentences exactly as without token types (a model with no cross-encoded input)
    token_types: bool = True

    def setup(self):
        self.embeddings = Embeddings(self.config, self.dtype)
        if type_count(self.config) > 1:  # BERT's rows 1.. minus row 0 (row 0 is in the positions)
            init = jax.nn.initializers.normal(self.config.initializer_range)
            self.type_offsets = nn.Embed(type_count(self.config) - 1, self.config.dim, embedding_init=init)
        self.transformer = _Transformer(self.config, self.dtype, self.attention_impl)

    def offsets(self, ids: jax.Array, positions: jax.Array) -> jax.Array | None:
        """``[R, P, D]`` each token's token-type offset (0 for type 0), or None where all are type 0."""
        if type_count(self.config) < 2:
            return None
        sep = getattr(self.config, "sep_token_id", None)
        if not self.token_types or sep is None:
            self.type_offsets.embedding  # noqa: B018 -- (the parameter exists all the same: one tree for all)
            return None
        types = token_types(ids, positions, sep)
        return jnp.where(types[..., None] > 0, self.type_offsets(jnp.maximum(types - 1, 0)), 0.0)

    def __call__(
        self,
        ids: jax.Array,
        positions: jax.Array,
        segments: jax.Array,
        deterministic: bool = True,
        queries: jax.Array | None = None,
    ) -> jax.Array:
        x = self.embeddings(ids, positions, deterministic, self.offsets(ids, positions))  # [R, P, D]
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
        bias = jnp.where(same, 0.0, -1e30)[:, None].astype(x.dtype)  # [R, 1, P, P]
        return self.transformer(x, bias, deterministic, queries)
