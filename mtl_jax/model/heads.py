"""What a task's head is made of, shared by the model (which runs the heads) and the task types
(which say what each head computes): a leaf module, so neither side imports the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class Features(NamedTuple):
    """What a head reads: pooled embeddings per slot and, when a head needs them, token states."""

    pooled: jax.Array  # [R, S, D] float32: slot s of row r, the s-th segment of the row
    dropped: jax.Array  # [R, S, D] the same after the head dropout (training)
    tokens: jax.Array | None  # [R, P, D] token states after the head dropout (token-level heads)
    scales: jax.Array | None = None  # [R, S, 1] 1 / the pooled embeddings' norms where the checkpoint normalises them
    guide: jax.Array | None = None  # [R, S, D] the starting encoder's pooled embeddings (a head with guide: initial)


def dense_head(spec: HeadSpec, x: jax.Array) -> jax.Array:
    """``nn.Dense(spec.outputs)`` named after the task over the last axis of ``x`` ``[..., D]``, as one
    2-D product (rows flattened: one contracted axis in the forward and the backward pass)."""
    y = nn.Dense(spec.outputs, name=spec.name)(x.reshape(-1, x.shape[-1]))
    return y.reshape(x.shape[:-1] + (spec.outputs,))


def slot_head(spec: HeadSpec, features: Features) -> jax.Array:
    """The plain head: a Dense layer over each slot's pooled embedding (after dropout), ``[R, S, outputs]``."""
    return dense_head(spec, features.dropped)


class HeadSpec(NamedTuple):
    """What the model needs to know of a task to build and run its head (hashable, for the Flax module)."""

    name: str
    outputs: int
    build: Callable[[HeadSpec, Features], jax.Array] = slot_head  # the head's outputs, inside the model
    options: tuple = ()  # (key, value) pairs of the task's settings its head reads
    tokens: bool = False  # the head reads token states (a token-level task)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


def as_head(head) -> HeadSpec:
    """A :class:`HeadSpec`; a plain ``(name, classes)`` pair is a classification head over each slot."""
    return head if isinstance(head, HeadSpec) else HeadSpec(*head)


def next_slot(x: jax.Array, k: int = 1) -> jax.Array:
    """``x`` ``[R, S, ...]`` moved ``k`` slots to the left along S (zeros at the end): an example's
    segments sit in consecutive slots of one row, so its k-th segment is ``next_slot(x, k)`` at its first slot."""
    pad = jnp.zeros_like(x[:, :k])
    return jnp.concatenate([x[:, k:], pad], axis=1)


def inverse_norm(x: jax.Array) -> jax.Array:
    """``1 / |x|`` along the last axis (kept), with a finite gradient at zero (an empty slot; the
    norm's own gradient there is NaN)."""
    return jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x`` at unit length along its last axis; an all-zero ``x`` (an empty slot) stays zero."""
    return x * inverse_norm(x)
