"""Matrix-multiply FLOPs of a train step or an encoder pass, counted from what XLA computes (for MFU).

Each layer is its products: the Q, K, V, output and two feed-forward projections (``2 m k n``
for ``m`` rows of ``k`` -> ``n``), attention's scores and weighted sum (``2 q L d`` each for ``q``
queries over a row of ``L`` tokens), and LoRA's two adapter products on each targeted projection.
The backward pass computes a weight gradient for each weight that trains (an adapter's for
the adapter) and an input gradient wherever something below the input trains: the layer's
own weights or adapters upstream of it, or anything in a lower layer or the embeddings. So
the lowest trainable layer skips its Q/K/V input gradients, a frozen encoder has no backward
pass, and LoRA runs input gradients through every layer but the weight gradients of the
adapters alone. XLA drops exactly these products (a test counts the dot products of compiled
steps). cls pooling computes only ``slots`` queries per row in the last layer (keys and values
still cover every token); mean pooling over packed rows is one product per row (membership by
hidden states), and its input gradient when the encoder trains.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import numpy as np

from mtl_jax.model.lora import lora_of


class Product(NamedTuple):
    rows: int
    inputs: int
    outputs: int
    target: str  # the LoRA target name of the projection
    upstream: tuple[str, ...]  # this layer's projections whose weights shape this product's input


def layer_products(dim: int, hidden: int, n: int, q: int) -> list[Product]:
    """The dense products of one layer over ``n`` tokens, ``q`` of which are queries."""
    qkv = ("q", "k", "v")
    return [
        Product(q, dim, dim, "q", ()),
        Product(n, dim, dim, "k", ()),
        Product(n, dim, dim, "v", ()),
        Product(q, dim, dim, "out", qkv),
        Product(q, dim, hidden, "ffn", (*qkv, "out")),
        Product(q, hidden, dim, "ffn", (*qkv, "out", "ffn")),
    ]


def layer_flops(config, rows: int, length: int, queries: int | None, grads: dict | None = None) -> float:
    """One layer's forward over ``rows`` x ``length`` tokens (``queries`` per row, or all) and, with
    ``grads`` (``below``: anything under the layer trains; ``weights``: its weights train; ``lora``:
    the adapter targets that train), the backward products those need."""
    n = rows * length
    q = n if queries is None else rows * queries
    lora = lora_of(config)
    targets = set(lora.targets) if lora else set()
    g = grads or {"below": False, "weights": False, "lora": set()}
    total = 0.0
    for p in layer_products(config.dim, config.hidden_dim, n, q):
        dense = 2.0 * p.rows * p.inputs * p.outputs
        input_grad = g["below"] or (g["weights"] and bool(p.upstream)) or bool(g["lora"] & set(p.upstream))
        total += dense * (1 + g["weights"] + input_grad)
        if p.target in targets:
            a, b = 2.0 * p.rows * p.inputs * lora.rank, 2.0 * p.rows * lora.rank * p.outputs
            trains = p.target in g["lora"]
            total += a + b + trains * (a + b) + (trains or input_grad) * b + input_grad * a
    attention = 2.0 * q * length * config.dim  # the scores, and again the weighted sum
    path = {t: g["below"] or g["weights"] or t in g["lora"] for t in ("q", "k", "v")}
    scores_grad = path["q"] or path["k"]
    return total + attention * (2 + scores_grad + path["q"] + path["k"] + path["v"])


def embed_flops(config, rows: int, length: int, pooling: str, slots: int = 1) -> float:
    """The encoder's forward and pooling over ``rows`` x ``length`` tokens, ``slots`` sentences a row
    (as ``encode()`` and the embedding cache run it)."""
    return train_step_flops(config, rows, length, set(), pooling, slots, num_classes=0)


def train_step_flops(
    config,
    batch: int,
    length: int,
    trainable: set[str],
    pooling: str,
    slots: int = 1,
    num_classes: int = 5,
) -> float:
    """FLOPs of one train step over ``batch`` rows of ``length`` tokens with ``slots`` sentence slots per
    row (1: one sentence a row; ``packing.MAX_SEGMENTS``: packed), ``trainable`` naming the parameter
    groups that train (``embeddings``, ``layer_<i>``, ``lora``; ``mtl_jax.training.freezing``): the
    encoder's forward and the backward products it needs, pooling, and the heads (forward, weight
    gradient, and input gradient when the encoder trains)."""
    lora = lora_of(config)
    adapters = set(lora.targets) if lora and "lora" in trainable else set()
    below = "embeddings" in trainable
    total = 0.0
    for i in range(config.n_layers):
        weights = f"layer_{i}" in trainable
        queries = slots if pooling == "cls" and i == config.n_layers - 1 else None
        grads = {"below": below, "weights": weights, "lora": adapters}
        total += layer_flops(config, batch, length, queries, grads)
        below = below or weights or bool(adapters)
    mean = 2.0 * batch * length * slots * config.dim if pooling == "mean" and slots > 1 else 0.0
    return total + (1 + below) * mean + (2 + below) * 2.0 * batch * slots * config.dim * num_classes


_DEFINED = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*lhs_contracting_dims=\{([\d,]*)\}")


def compiled_dot_flops(hlo: str) -> float:
    """The FLOPs of every dot product in a compiled XLA:CPU program's text (``compiled.as_text()``):
    what ``train_step_flops`` counts, read off what XLA kept. (GPU programs call GEMM kernels
    instead of dots: 0 there.)"""
    dims = {m.group(1): [int(x) for x in m.group(2).split(",") if x] for m in _DEFINED.finditer(hlo)}
    total = 0.0
    for m in _DOT.finditer(hlo):
        out = [int(x) for x in m.group(1).split(",") if x]
        lhs = dims[m.group(2)]
        total += 2.0 * np.prod(out) * np.prod([lhs[int(i)] for i in m.group(3).split(",") if i])
    return float(total)


# bf16 dense peak (TFLOP/s) by device kind, for the MFU figures
PEAKS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}


def model_flops_utilization(flops: float, seconds: float, peak_tflops: float | None = None) -> dict:
    """Achieved TFLOP/s of ``flops`` (counted as above) done in ``seconds`` and, on known chips (or with
    ``peak_tflops``), the MFU against the chip's bf16 dense peak (float32 runs too)."""
    kind = str(jax.devices()[0].device_kind)
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None)
    out = {"tflop": round(flops / 1e12, 4), "model_tflops_per_s": round(flops / seconds / 1e12, 3)}
    if peak:
        out["mfu"] = round(flops / seconds / (peak * 1e12), 4)
        out["peak_tflops"] = peak
    return out
