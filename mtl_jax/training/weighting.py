"""How the per-task losses become one update: ``--loss-weighting``.

Loss methods put a weight on each task's mean loss ``L_t``; the weights are computed
between the forward and the backward pass (one backward pass in all, as for a plain sum):

- ``sum``: weight 1 per task (the design card's summed loss);
- ``static``: the per-task ``weight`` of the config;
- ``uncertainty``: Kendall, Gal & Cipolla (2018), classification form: a learned
  log-variance ``s_t`` per task, loss ``sum_t exp(-s_t) * L_t + s_t / 2``; the ``s_t``
  live in ``params["loss_weights"]`` and train with the heads;
- ``dwa``: Dynamic Weight Average, Liu, Johns & Davison (2019): ``w_t = T softmax_t(r_t / temp)``
  with ``r_t = L_t(e-1) / L_t(e-2)``, the mean training losses of the last two periods
  (weight 1 in the first two); a period is an epoch as in the paper, or ``dwa_period`` steps;
- ``rlw``: Random Loss Weighting, Lin et al. (2021): ``w = softmax(eps)``, ``eps ~ N(0, I)``
  drawn anew every step;
- ``famo``: Fast Adaptive Multitask Optimization, Liu et al. (2023): task logits ``xi``,
  ``z = softmax(xi)``, loss ``sum_t z_t log L_t / c`` with ``c = sum_t z_t / L_t`` held
  constant; ``xi`` follows Adam (L2 decay ``gamma``) on the gradient of ``z`` against the
  drop of each ``log L_t``. The drop is measured between consecutive steps (this step's
  losses against the next step's, on its batch) rather than by a second forward pass
  over the same batch as the authors' code does: that pass would cost a third of a step.

Gradient methods need each task's gradient: one vmapped backward pass over the tasks'
sub-batches (task-stacked batches, see :func:`mtl_jax.training.steps.per_task_grads`), never a
Python loop of backward passes. They combine the gradients on the shared encoder:

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
  only the last layer: the vmapped pass has them anyway).

Task heads get their own task's gradient (``gradnorm``: weighted by ``w_t``). Every
function here is pure; a method's running state (``init_state``) lives in the train state
and is checkpointed with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from optax.projections import projection_simplex

LOSS_METHODS = ("sum", "static", "uncertainty", "dwa", "rlw", "famo")
GRADIENT_METHODS = ("pcgrad", "mgda", "cagrad", "gradnorm")
METHODS = LOSS_METHODS + GRADIENT_METHODS
EVERY_TASK = GRADIENT_METHODS + ("famo",)  # every step holds every task (task-stacked batches)


@dataclass(frozen=True)
class Weighting:
    """A loss-weighting method and its hyperparameters (the published defaults)."""

    method: str = "sum"
    gradnorm_alpha: float = 1.5  # restoring force towards equal training rates
    gradnorm_lr: float = 0.025  # Adam learning rate of the GradNorm weights
    dwa_temperature: float = 2.0
    dwa_period: int = 1  # steps over which DWA averages each task's loss (the trainer's default: an epoch)
    cagrad_c: float = 0.5  # radius of CAGrad's ball around the mean gradient, relative to its norm
    famo_lr: float = 0.025  # Adam learning rate of the FAMO task logits
    famo_decay: float = 0.001  # FAMO's gamma: L2 decay of the task logits

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown loss weighting {self.method!r}; choose from {', '.join(METHODS)}")

    @classmethod
    def from_config(cls, cfg) -> Weighting:
        """From a :class:`mtl_jax.config.TrainConfig` (``--loss-weighting`` and its ``--gradnorm-alpha``, ...)."""
        return cls(
            method=cfg.loss_weighting,
            gradnorm_alpha=cfg.gradnorm_alpha,
            gradnorm_lr=cfg.gradnorm_lr,
            dwa_temperature=cfg.dwa_temperature,
            dwa_period=cfg.dwa_period or 1,
            cagrad_c=cfg.cagrad_c,
            famo_lr=cfg.famo_lr,
            famo_decay=cfg.famo_decay,
        )

    @property
    def every_task(self) -> bool:
        return self.method in EVERY_TASK

    def famo_tx(self) -> optax.GradientTransformation:
        # torch's Adam(weight_decay=gamma): L2 added to the gradient before the moments
        return optax.chain(optax.add_decayed_weights(self.famo_decay), optax.adam(self.famo_lr))

    def gradnorm_tx(self) -> optax.GradientTransformation:
        return optax.adam(self.gradnorm_lr)

    def add_params(self, params: dict, tasks) -> dict:
        """``params`` plus what the method learns with the model: ``uncertainty``'s log-variances (0: weight 1)."""
        if self.method != "uncertainty":
            return params
        return params | {"loss_weights": {t: jnp.zeros((), jnp.float32) for t in tasks}}

    def init_state(self, n_tasks: int) -> dict:
        """The method's running state (``{}`` for the stateless ones)."""
        # (a fresh array per entry: the train state is donated, and one buffer may not be donated twice)
        zeros, started = lambda: jnp.zeros((n_tasks,), jnp.float32), jnp.zeros((), bool)  # noqa: E731
        if self.method == "dwa":
            # this period's loss sums and counts, its steps so far; the last two finished periods' mean losses
            history = jnp.ones((2, n_tasks), jnp.float32)
            count = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
            return {"sum": zeros(), "count": zeros(), "history": history, "periods": count(), "steps": count()}
        if self.method == "famo":
            return {"logits": zeros(), "opt": self.famo_tx().init(zeros()), "prev": zeros(), "started": started}
        if self.method == "gradnorm":
            w = jnp.ones((n_tasks,), jnp.float32)
            return {"w": w, "opt": self.gradnorm_tx().init(w), "initial": zeros(), "started": started}
        return {}

    # ---- loss methods

    def loss_weights(self, state: dict, losses, present, static, key) -> tuple[jax.Array, jax.Array, dict]:
        """``(weights [T], loss, new state)``: the backward pass runs with ``d loss / d L_t = weights_t``.

        ``losses`` are the tasks' mean losses ``[T]`` (0 where absent), ``present`` 1/0 per
        task, ``static`` the config's weights (used by ``static``).
        """
        n = losses.shape[0]
        if self.method == "static":
            w = static
        elif self.method == "dwa":
            w = dwa_weights(state["history"], state["periods"], self.dwa_temperature)
            state = dwa_update(state, losses, present, self.dwa_period)
        elif self.method == "rlw":
            w = jax.nn.softmax(jax.random.normal(key, (n,)))
        elif self.method == "famo":
            state = famo_update(state, losses, self.famo_tx())
            z = jax.nn.softmax(state["logits"])
            safe = losses + 1e-8
            c = jnp.sum(z / safe)
            return z / (c * safe), jnp.sum(z * jnp.log(safe)) / c, state
        else:  # sum, uncertainty (its terms already hold exp(-s_t))
            w = jnp.ones((n,), jnp.float32)
        return w, jnp.sum(w * losses), state

    # ---- gradient methods

    def combine(self, state: dict, losses, task_grads, shared, key) -> tuple[dict, jax.Array, jax.Array, dict]:
        """``(grads, task coefficients [T], loss, new state)`` from per-task gradients and losses ``[T]``.

        ``task_grads``: the whole gradient tree with a leading task axis ``T``; ``shared``:
        its trainable encoder part (``None`` when the encoder is frozen: the heads then get
        their own task's gradient and the state stays).
        """
        n = losses.shape[0]
        total = lambda coef, tree: jax.tree.map(lambda g: jnp.tensordot(coef.astype(g.dtype), g, 1), tree)  # noqa: E731
        if self.method == "gradnorm":
            coef = state["w"]
            if shared is not None:
                state = gradnorm_update(state, losses, gram_matrix(shared), self.gradnorm_alpha, self.gradnorm_tx())
            return total(coef, task_grads), coef, jnp.sum(coef * losses), state
        ones = jnp.ones((n,), jnp.float32)
        grads = total(ones, task_grads)  # the heads' (and a frozen encoder's) own-task gradients
        if shared is None:
            return grads, ones, jnp.sum(losses), state
        if self.method == "pcgrad":
            grads["encoder"] = pcgrad(shared, key)
            return grads, ones, jnp.sum(losses), state
        gram = gram_matrix(shared)
        coef = min_norm_weights(gram) if self.method == "mgda" else cagrad_coefficients(gram, self.cagrad_c)
        grads["encoder"] = total(coef, shared)
        return grads, coef, jnp.sum(losses), state


def mean_losses(per_task: dict, tasks, counts=None) -> tuple[jax.Array, jax.Array]:
    """Per task (in ``tasks``' order): mean loss over its labelled rows (0 when none) ``[T]``, and 1/0 present ``[T]``.

    ``counts`` [T]: the denominators instead of the rows here (a micro-batch: the whole batch's).
    """
    if counts is None:
        counts = jnp.stack([per_task[t]["count"] for t in tasks]).astype(jnp.float32)
    means = jnp.stack([per_task[t]["loss_sum"] for t in tasks]) / jnp.maximum(counts, 1)
    return means, (counts > 0).astype(jnp.float32)


def uncertainty_terms(means, present, log_vars, share: float = 1.0) -> jax.Array:
    """``exp(-s_t) * L_t + share * s_t / 2`` per task ``[T]`` (``share``: a micro-batch's part of the
    batch); a task absent from the batch adds nothing, not even its ``s_t / 2`` (else the
    regulariser alone would push ``s_t`` down on every batch of the other tasks)."""
    return present * (jnp.exp(-log_vars) * means + share * 0.5 * log_vars)


def dwa_weights(history, periods, temperature: float) -> jax.Array:
    """``T softmax(r / temperature)``, ``r = history[1] / history[0]``; ones before two periods have finished."""
    r = history[1] / jnp.maximum(history[0], 1e-20)
    w = history.shape[1] * jax.nn.softmax(r / temperature)
    return jnp.where(periods >= 2, w, jnp.ones_like(w))


def dwa_update(state: dict, losses, present, period: int) -> dict:
    """Adds a step's losses to the period's sums; the period's last step moves the history on."""
    total, count, steps = state["sum"] + losses * present, state["count"] + present, state["steps"] + 1
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1), state["history"][1])  # (an absent task keeps its last)
    rolled = {
        "sum": jnp.zeros_like(total),
        "count": jnp.zeros_like(count),
        "history": jnp.stack([state["history"][1], mean]),
        "periods": state["periods"] + 1,
        "steps": jnp.zeros_like(steps),
    }
    going = {"sum": total, "count": count, "history": state["history"], "periods": state["periods"], "steps": steps}
    return jax.tree.map(lambda a, b: jnp.where(steps >= period, a, b), rolled, going)


def famo_update(state: dict, losses, tx: optax.GradientTransformation) -> dict:
    """One FAMO step of the task logits from the drop of ``log L`` since the previous step (none at the first)."""
    log_l = jnp.log(losses + 1e-8)
    _, pullback = jax.vjp(jax.nn.softmax, state["logits"])
    (grad,) = pullback(state["prev"] - log_l)
    updates, opt = tx.update(grad, state["opt"], state["logits"])
    moved = {"logits": optax.apply_updates(state["logits"], updates), "opt": opt}
    kept = {"logits": state["logits"], "opt": state["opt"]}
    new = jax.tree.map(lambda a, b: jnp.where(state["started"], a, b), moved, kept)
    return new | {"prev": log_l, "started": jnp.ones((), bool)}


def gradnorm_update(state: dict, losses, gram, alpha: float, tx: optax.GradientTransformation) -> dict:
    """One GradNorm step of the weights: Adam on ``d L_grad / d w``, then clipped at 0 and renormalised to sum ``T``."""
    n = losses.shape[0]
    initial = jnp.where(state["started"], state["initial"], losses)  # L_t(0): the first step's losses
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))  # |g_t|
    w = state["w"]
    g_w = w * norms  # G_t = |grad of w_t L_t|
    ratio = losses / jnp.maximum(initial, 1e-20)
    target = jnp.mean(g_w) * (ratio / jnp.maximum(jnp.mean(ratio), 1e-20)) ** alpha
    grad = jnp.sign(g_w - target) * norms
    updates, opt = tx.update(grad, state["opt"], w)
    w = jnp.maximum(optax.apply_updates(w, updates), 0.0)
    w = n * w / jnp.maximum(jnp.sum(w), 1e-20)
    return {"w": w, "opt": opt, "initial": initial, "started": jnp.ones((), bool)}


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


def gram_matrix(task_grads) -> jax.Array:
    """``G[i, j] = g_i . g_j`` ``[T, T]`` over a pytree whose leaves carry a leading task axis (float32)."""
    flat = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(task_grads)]
    return sum(f @ f.T for f in flat)


def cosine_matrix(task_grads) -> tuple[jax.Array, jax.Array]:
    """Per-task gradient norms ``[T]`` and pairwise cosines ``[T, T]`` over a stacked pytree."""
    gram = gram_matrix(task_grads)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
    return norms, gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-20)
