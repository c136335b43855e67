"""How the per-task losses become one update: ``--loss-weighting``.

- ``sum``: every task's mean loss with weight 1 (the design card's summed loss);
- ``static``: the per-task ``weight`` of the config;
- ``uncertainty``: Kendall, Gal & Cipolla (2018), classification form: a learned
  log-variance ``s_t`` per task, loss ``sum_t exp(-s_t) * L_t + s_t / 2``; the ``s_t``
  live in ``params["loss_weights"]`` and train with the heads;
- ``pcgrad``: Yu et al. (2020): each task's gradient on the shared encoder is projected
  off the normal plane of every other task's gradient it conflicts with (negative dot
  product), then the projected gradients are summed. The heads get their own task's
  gradient unchanged.

Each is a pure function of arrays, unit-tested against hand-computed examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("sum", "static", "uncertainty", "pcgrad")


def mean_losses(per_task: dict) -> tuple[dict, dict]:
    """Per task: mean loss over its labelled rows (0 when none) and whether it had any."""
    means = {t: m["loss_sum"] / jnp.maximum(m["count"], 1) for t, m in per_task.items()}
    present = {t: (m["count"] > 0).astype(jnp.float32) for t, m in per_task.items()}
    return means, present


def weighted_loss(per_task: dict, weights: dict[str, float]) -> jax.Array:
    """``sum_t w_t * L_t``; a task with no labels in the batch adds 0."""
    means, _ = mean_losses(per_task)
    return sum(weights[t] * means[t] for t in per_task)


def uncertainty_loss(per_task: dict, log_vars: dict[str, jax.Array]) -> jax.Array:
    """``sum_t exp(-s_t) * L_t + s_t / 2`` over the tasks present in the batch.

    A task absent from the batch adds nothing, not even its ``s_t / 2`` (else the
    regulariser alone would push ``s_t`` down on every batch of the other tasks).
    """
    means, present = mean_losses(per_task)
    return sum(present[t] * (jnp.exp(-log_vars[t]) * means[t] + 0.5 * log_vars[t]) for t in per_task)


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def pcgrad(task_grads, key: jax.Array | None = None):
    """PCGrad over a pytree whose leaves carry a leading task axis ``T``; returns the summed tree.

    For each task i, the other tasks j are visited in a random order (``key``; fixed
    order without one) and, where ``g_i . g_j < 0``, ``g_i -= (g_i . g_j) / |g_j|^2 g_j``.
    """
    n = jax.tree.leaves(task_grads)[0].shape[0]
    take = lambda j: jax.tree.map(lambda g: g[j], task_grads)  # noqa: E731
    out = None
    for i in range(n):
        g = take(i)
        order = jnp.arange(n) if key is None else jax.random.permutation(jax.random.fold_in(key, i), n)
        for k in range(n):
            j = order[k]
            gj = take(j)
            dot = _vdot(g, gj)
            coef = jnp.where((j != i) & (dot < 0), dot / jnp.maximum(_vdot(gj, gj), 1e-20), 0.0)
            g = jax.tree.map(lambda a, b: a - coef.astype(a.dtype) * b, g, gj)
        out = g if out is None else jax.tree.map(jnp.add, out, g)
    return out


def cosine_matrix(task_grads) -> tuple[jax.Array, jax.Array]:
    """Per-task gradient norms ``[T]`` and pairwise cosines ``[T, T]`` over a stacked pytree."""
    flat = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(task_grads)]
    gram = sum(f @ f.T for f in flat)  # [T, T]
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    return norms, gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-20)
