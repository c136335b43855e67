"""Gradient methods: they need each task's gradient, from one vmapped backward pass over the
tasks' sub-batches (task-stacked batches, see :func:`mtl_jax.training.steps.per_task_grads`),
and combine them on the shared encoder. Task heads get their own task's gradient.

- ``pcgrad``: Yu et al. (2020): each task's gradient is projected off the normal plane of
  every other task's gradient it conflicts with (negative dot product), then summed;
- ``mgda``: Sener & Koltun (2018): the min-norm point ``sum_t a_t g_t`` of the convex hull
  of the task gradients (the point their Frank-Wolfe solver seeks; solved here on the
  ``T x T`` Gram matrix by accelerated projected gradient, exact for two tasks). Taken on
  the encoder's parameter gradients: their cheaper upper bound ("MGDA-UB", gradients on the
  shared representation) degenerates here, since tasks do not share examples, so those
  gradients are orthogonal and the min-norm point is just inverse squared norms;
- ``cagrad``: Liu et al. (2021): ``d = (g0 + sqrt(phi) g_w / |g_w|) / (1 + c^2)`` with ``g0``
  the mean gradient, ``phi = c^2 |g0|^2`` and ``w`` minimising ``g_w . g0 + sqrt(phi) |g_w|``
  over the simplex (the authors' code, rescale 1);
- ``gradnorm``: Chen et al. (2018): learned weights ``w_t`` (sum ``T``) on the losses; ``w``
  follows Adam on the gradient of ``sum_t |w_t |g_t| - mean(w|g|) r_t^alpha|`` (the target
  held constant), ``r_t`` each task's loss ratio ``L_t / L_t(0)`` over their mean, ``|g_t|``
  the norm of task t's gradient on the encoder's trainable parameters (all of them, not
  only the last layer: the vmapped pass has them anyway); the heads' gradients are weighted by ``w_t``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.projections import projection_simplex

from mtl_jax.options import NON_NEGATIVE, POSITIVE, option
from mtl_jax.training.weighting.base import Method, register


def weighted_sum(coef, tree):
    """``sum_t coef_t tree[t]`` over a pytree whose leaves carry a leading task axis."""
    return jax.tree.map(lambda g: jnp.tensordot(coef.astype(g.dtype), g, 1), tree)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientMethod(Method):
    """Heads get their own task's gradient; ``encoder_grads`` combines the encoder's."""

    every_task = True
    uses_task_grads = True

    def combine(self, state, losses, task_grads, shared, key):
        """``task_grads``: the whole gradient tree with a leading task axis ``T``; ``shared``: its
        trainable encoder part (``None`` when the encoder is frozen: the state then stays)."""
        ones = jnp.ones(losses.shape, jnp.float32)
        grads = weighted_sum(ones, task_grads)  # the heads' (and a frozen encoder's) own-task gradients
        if shared is None:
            return grads, ones, jnp.sum(losses), state
        grads["encoder"], coef = self.encoder_grads(shared, key)
        return grads, coef, jnp.sum(losses), state

    def encoder_grads(self, shared, key) -> tuple[Any, jax.Array]:
        raise NotImplementedError


@register("pcgrad")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PCGrad(GradientMethod):
    about = "projects each task's encoder gradient off the others' it conflicts with (Yu et al. 2020)"

    def encoder_grads(self, shared, key):
        return pcgrad(shared, key), jnp.ones((jax.tree.leaves(shared)[0].shape[0],), jnp.float32)


@register("mgda")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MGDA(GradientMethod):
    about = "the min-norm point of the task gradients' hull (Sener & Koltun 2018)"

    def encoder_grads(self, shared, key):
        coef = min_norm_weights(gram_matrix(shared))
        return weighted_sum(coef, shared), coef


@register("cagrad")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CAGrad(GradientMethod):
    about = "the best worst-task improvement near the mean gradient (Liu et al. 2021)"
    c: float = option(0.5, "c, the radius of the ball around the mean gradient, relative to its norm", NON_NEGATIVE)

    def encoder_grads(self, shared, key):
        coef = cagrad_coefficients(gram_matrix(shared), self.c)
        return weighted_sum(coef, shared), coef


class GradNormState(NamedTuple):
    w: jax.Array  # [T] the task weights (sum T)
    opt: Any  # Adam's state of w
    initial: jax.Array  # [T] L_t(0): the first step's losses
    started: jax.Array  # bool


@register("gradnorm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GradNorm(GradientMethod):
    about = "weights learned towards equal training rates (Chen et al. 2018)"
    alpha: float = option(1.5, "the restoring force alpha towards equal training rates", NON_NEGATIVE)
    lr: float = option(0.025, "Adam learning rate of the task weights", POSITIVE)

    def init(self, n_tasks: int) -> GradNormState:
        w = jnp.ones((n_tasks,), jnp.float32)
        return GradNormState(w, optax.adam(self.lr).init(w), jnp.zeros((n_tasks,), jnp.float32), jnp.zeros((), bool))

    def combine(self, state, losses, task_grads, shared, key):
        coef = state.w
        if shared is not None:
            state = gradnorm_update(state, losses, gram_matrix(shared), self.alpha, optax.adam(self.lr))
        return weighted_sum(coef, task_grads), coef, jnp.sum(coef * losses), state


def gradnorm_update(state: GradNormState, losses, gram, alpha: float, tx) -> GradNormState:
    """One GradNorm step of the weights: Adam on ``d L_grad / d w``, then clipped at 0 and renormalised to sum ``T``."""
    n = losses.shape[0]
    initial = jnp.where(state.started, state.initial, losses)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))  # |g_t|
    g_w = state.w * norms  # G_t = |grad of w_t L_t|
    ratio = losses / jnp.maximum(initial, 1e-20)
    target = jnp.mean(g_w) * (ratio / jnp.maximum(jnp.mean(ratio), 1e-20)) ** alpha
    grad = jnp.sign(g_w - target) * norms
    updates, opt = tx.update(grad, state.opt, state.w)
    w = jnp.maximum(optax.apply_updates(state.w, updates), 0.0)
    return GradNormState(n * w / jnp.maximum(jnp.sum(w), 1e-20), opt, initial, jnp.ones((), bool))


def _normalised(gram) -> jax.Array:
    """The Gram matrix scaled to mean diagonal 1 (the simplex problems below do not change)."""
    return gram / jnp.maximum(jnp.trace(gram) / gram.shape[0], 1e-30)


def _simplex_minimize(f, step, n: int, iters: int = 200) -> jax.Array:
    """``argmin f`` over the probability simplex in ``R^n``: FISTA with ``step(w)``, projecting onto the simplex."""
    grad = jax.grad(f)

    def body(_, carry):
        w, y, t = carry
        nxt = projection_simplex(y - step(y) * grad(y))
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        return nxt, nxt + (t - 1) / t_next * (nxt - w), t_next

    start = jnp.full((n,), 1.0 / n, jnp.float32)
    return jax.lax.fori_loop(0, iters, body, (start, start, jnp.float32(1.0)))[0]


def min_norm_weights(gram) -> jax.Array:
    """MGDA's ``a = argmin_{a in simplex} |sum_t a_t g_t|^2`` from the Gram matrix ``[T, T]`` of the task gradients."""
    a = _normalised(gram)
    return _simplex_minimize(lambda w: w @ a @ w, lambda w: 0.5 / jnp.trace(a), a.shape[0])


def cagrad_coefficients(gram, c: float) -> jax.Array:
    """CAGrad's direction as coefficients on the task gradients: ``d = sum_t coef_t g_t``."""
    n = gram.shape[0]
    a = _normalised(gram)
    mean = jnp.full((n,), 1.0 / n, jnp.float32)
    k = c * jnp.sqrt(jnp.maximum(jnp.mean(a), 0.0) + 1e-8)  # sqrt(phi), normalised
    norm = lambda w: jnp.sqrt(w @ a @ w + 1e-8)  # noqa: E731
    # f's curvature is at most k * trace(a) / |g_w|
    w = _simplex_minimize(lambda w: w @ a @ mean + k * norm(w), lambda w: norm(w) / (k * jnp.trace(a) + 1e-20), n)
    return (mean + k / norm(w) * w) / (1 + c * c)


def _vdot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def pcgrad(task_grads, key: jax.Array | None = None):
    """PCGrad over a pytree whose leaves carry a leading task axis ``T``; returns the summed tree.

    For each task i, the other tasks j are visited in a random order (``key``; fixed
    order without one) and, where ``g_i . g_j < 0``, ``g_i -= (g_i . g_j) / |g_j|^2 g_j``.
    Both loops are ``fori_loop``s: the program does not grow with ``T^2`` (nine tasks compile as
    fast as two), and one projected gradient is held at a time beside the sum.
    """
    n = jax.tree.leaves(task_grads)[0].shape[0]
    take = lambda j: jax.tree.map(lambda g: g[j], task_grads)  # noqa: E731
    if key is None:
        orders = jnp.tile(jnp.arange(n), (n, 1))
    else:
        orders = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), n))(jnp.arange(n))

    def project(i, g):
        def off(k, g):
            j = orders[i, k]
            gj = take(j)
            dot = _vdot(g, gj)
            coef = jnp.where((j != i) & (dot < 0), dot / jnp.maximum(_vdot(gj, gj), 1e-20), 0.0)
            return jax.tree.map(lambda a, b: a - coef.astype(a.dtype) * b, g, gj)

        return jax.lax.fori_loop(0, n, off, g)

    def add(i, total):
        return jax.tree.map(jnp.add, total, project(i, take(i)))

    return jax.lax.fori_loop(1, n, add, project(0, take(0)))


def gram_matrix(task_grads) -> jax.Array:
    """``G[i, j] = g_i . g_j`` ``[T, T]`` over a pytree whose leaves carry a leading task axis (float32)."""
    flat = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(task_grads)]
    return sum(f @ f.T for f in flat)


def cosine_matrix(task_grads) -> tuple[jax.Array, jax.Array]:
    """Per-task gradient norms ``[T]`` and pairwise cosines ``[T, T]`` over a stacked pytree."""
    gram = gram_matrix(task_grads)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    return norms, gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-20)
