"""Gradient caching (GradCache): a training batch's encoder pass in chunks, for in-batch negatives
over batches larger than the device's memory holds activations for.

The step's rows are split into ``k`` chunks (:func:`~mtl_jax.data.batching.micro_batches`: each
device's rows spread evenly over them). The forward pass encodes one chunk after another and keeps
only each chunk's pooled embeddings (and token states for a per-token head), not its activations;
the heads and every task's loss then see the whole batch at once, so a retrieval query's
negatives are every other passage of the step, on every device. In the backward pass each chunk's
encoder pass runs again, with the same dropout, and takes its share of the embeddings' gradient:
``jax.checkpoint`` over ``lax.map`` is exactly that, one chunk's activations alive at a time.

What it costs: one more encoder forward pass per step. What it changes: nothing in the loss or
its gradient, except that each chunk draws its own dropout masks (``fold_in(key, chunk)``); with
dropout off the step equals the one without chunks (tested to 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtl_jax.data.batching import TokenBatch, micro_batches, micro_joined


def chunked_outputs(model, variables: dict, batch: TokenBatch, k: int, key: jax.Array) -> dict:
    """``{task: outputs}`` of a training batch (dropout on) whose encoder pass runs in ``k`` chunks."""
    chunks = micro_batches((batch.ids, batch.positions, batch.segments), k)
    tokens = model.token_heads

    def encode(xs):
        (ids, positions, segments), i = xs
        rngs = {"dropout": jax.random.fold_in(key, i)}
        args = (ids, positions, segments, batch.num_segments, False, tokens)
        return model.apply(variables, *args, rngs=rngs, method="encode_packed")

    def guide(arrays):  # the starting encoder's embeddings (guide: initial): no gradient, nothing to keep
        return model.apply(variables, *arrays, batch.num_segments, method="guide_packed")

    pooled, hidden = jax.lax.map(jax.checkpoint(encode, prevent_cse=False), (chunks, jnp.arange(k)))
    pooled = micro_joined(pooled)
    hidden = None if hidden is None else micro_joined(hidden)
    guided = micro_joined(jax.lax.map(guide, chunks)) if "guide" in variables["params"] else None
    return model.apply(variables, pooled, False, hidden, guided, rngs={"dropout": key}, method="classify")
