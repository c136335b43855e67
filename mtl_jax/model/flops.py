"""Matrix-multiply FLOPs of a train step, counted from what the step computes (for MFU figures).

A forward pass of ``n`` tokens through one layer costs ``8 n d^2`` (Q, K, V, output
projections) ``+ 4 n d h`` (feed-forward) ``+ 4 n L d`` (scores and weighted sum over a row
of ``L`` tokens), counting a multiply-add as 2. The backward pass costs twice the forward of
a layer whose weights train (input and weight gradients) and once for a frozen layer that
gradients still flow through; nothing below the lowest trainable layer. cls pooling computes
only one query per row in the last layer (its keys and values still cover every token).
"""

from __future__ import annotations


def layer_forward_flops(dim: int, hidden: int, rows: int, length: int, queries: int | None = None) -> float:
    """One transformer layer over ``rows`` x ``length`` tokens; with ``queries`` only that many per row
    go through the query/output projections, attention rows and feed-forward."""
    n = rows * length
    q = n if queries is None else rows * queries
    keys_values = 4 * n * dim * dim
    per_query = 4 * q * dim * dim + 4 * q * dim * hidden + 4 * q * length * dim
    return float(keys_values + per_query)


def train_step_flops(
    config,
    batch: int,
    length: int,
    trainable_layers: set[int],
    cls_pooling: bool,
    slots: int = 1,
    num_classes: int = 5,
) -> float:
    """FLOPs of one train step over ``batch`` rows of ``length`` tokens with ``slots`` sentence slots per
    row (1 padded, ``packing.MAX_SEGMENTS`` packed; cls computes a query per slot): the encoder's
    forward, the backward through the layers gradients need, and the heads (forward + backward)."""
    n_layers = config.n_layers
    forward = [
        layer_forward_flops(
            config.dim, config.hidden_dim, batch, length, slots if cls_pooling and i == n_layers - 1 else None
        )
        for i in range(n_layers)
    ]
    total = sum(forward)
    if trainable_layers:
        lowest = min(trainable_layers)
        total += sum((2 if i in trainable_layers else 1) * forward[i] for i in range(lowest, n_layers))
    return total + 3 * 2 * batch * slots * config.dim * num_classes
