"""LoRA (Hu et al. 2021) as a freezing scenario: ``--freeze lora``.

Each targeted dense layer of the encoder (``q``, ``k``, ``v``, ``out``: the attention's
projections; ``ffn``: both feed-forward layers) computes ``x W + b + (alpha / r) (x A) B``
with a rank-``r`` pair ``A`` ``[in, r]`` (random) and ``B`` ``[r, out]`` (zeros, so training
starts from the pretrained function). The adapters are the parameter group ``lora``; the
``lora`` scenario freezes the rest of the encoder (its weights stay bit for bit, hold no
optimizer state, and XLA drops their weight gradients) while the adapters and heads train.
The export merges ``W + (alpha / r) A B`` into plain weights: a sentence-transformers model
without adapters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mtl_jax.errors import MtlError
from mtl_jax.model.dense import affine

TARGETS = ("q", "k", "v", "out", "ffn")


@dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg) -> LoRA:
        """From ``--lora-rank``, ``--lora-alpha`` and ``--lora-targets`` (comma-separated)."""
        targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise MtlError(f"--lora-targets {cfg.lora_targets!r}: expected some of {','.join(TARGETS)}")
        return cls(cfg.lora_rank, cfg.lora_alpha, targets)


def with_lora(config, lora: LoRA | None):
    """A copy of an encoder config (``DistilBertConfig``) whose targeted dense layers carry ``lora``'s adapters."""
    config = copy.deepcopy(config)
    config.lora = lora
    return config


def lora_of(config) -> LoRA | None:
    return getattr(config, "lora", None)


class LoRADense(nn.Module):
    """``nn.Dense`` (same parameter names) plus a low-rank adapter ``(alpha / r) (x A) B``."""

    features: int
    lora: LoRA
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs, r = x.shape[-1], self.lora.rank
        kernel = self.param("kernel", self.kernel_init, (inputs, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.normal(1 / math.sqrt(inputs)), (inputs, r))
        b = self.param("lora_b", nn.initializers.zeros, (r, self.features))
        x = x.astype(self.dtype)
        y = affine(x, kernel.astype(self.dtype), bias.astype(self.dtype))
        return y + self.lora.scale * ((x @ a.astype(self.dtype)) @ b.astype(self.dtype))


def add_adapters(encoder_params: dict, shapes: dict, rng: jax.Array) -> dict:
    """Pretrained encoder parameters plus fresh adapters where ``shapes`` (the model's) has them."""
    flat = traverse_util.flatten_dict(encoder_params, sep="/")
    for i, (path, shape) in enumerate(sorted(traverse_util.flatten_dict(shapes, sep="/").items())):
        if path.endswith("/lora_a"):
            std = 1 / math.sqrt(shape.shape[0])
            flat[path] = std * jax.random.normal(jax.random.fold_in(rng, i), shape.shape, jnp.float32)
        elif path.endswith("/lora_b"):
            flat[path] = jnp.zeros(shape.shape, jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def merge_adapters(encoder_params: dict, lora: LoRA | None) -> dict:
    """Plain encoder parameters: each adapted kernel becomes ``W + (alpha / r) A B``, the adapters dropped."""
    if lora is None:
        return encoder_params
    flat = traverse_util.flatten_dict(encoder_params, sep="/")
    out = {k: v for k, v in flat.items() if not k.endswith(("/lora_a", "/lora_b"))}
    for path in flat:
        if path.endswith("/lora_a"):
            layer = path[: -len("/lora_a")]
            delta = jnp.asarray(flat[path]) @ jnp.asarray(flat[layer + "/lora_b"])
            out[layer + "/kernel"] = jnp.asarray(flat[layer + "/kernel"]) + lora.scale * delta
    return traverse_util.unflatten_dict(out, sep="/")
