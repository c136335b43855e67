"""``famo``: Fast Adaptive Multitask Optimization, Liu et al. (2023).

Task logits ``xi``, ``z = softmax(xi)``, loss ``sum_t z_t log L_t / c`` with ``c = sum_t z_t / L_t``
held constant; ``xi`` follows Adam (L2 decay ``gamma``) on the gradient of ``z`` against the
drop of each ``log L_t``. The drop is measured between consecutive steps (this step's losses
against the next step's, on its batch) rather than by a second forward pass over the same
batch as the authors' code does: that pass would cost a third of a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_jax.options import NON_NEGATIVE, POSITIVE, option
from mtl_jax.training.weighting.base import Method, register


class FamoState(NamedTuple):
    logits: jax.Array  # [T] xi
    opt: Any  # Adam's state of xi
    prev: jax.Array  # [T] the previous step's log L
    started: jax.Array  # bool: a previous step exists


@register("famo")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Famo(Method):
    about = "Fast Adaptive Multitask Optimization (Liu et al. 2023)"
    every_task = True
    weights_from_losses = True
    lr: float = option(0.025, "Adam learning rate of the task logits", POSITIVE)
    decay: float = option(0.001, "gamma, the L2 decay of the task logits", NON_NEGATIVE)

    def tx(self) -> optax.GradientTransformation:
        # torch's Adam(weight_decay=gamma): L2 added to the gradient before the moments
        return optax.chain(optax.add_decayed_weights(self.decay), optax.adam(self.lr))

    def init(self, n_tasks: int) -> FamoState:
        zeros = lambda: jnp.zeros((n_tasks,), jnp.float32)  # noqa: E731
        return FamoState(zeros(), self.tx().init(zeros()), zeros(), jnp.zeros((), bool))

    def weights(self, state, losses, present, key):
        state = famo_update(state, losses, self.tx())
        z = jax.nn.softmax(state.logits)
        safe = losses + 1e-8
        c = jnp.sum(z / safe)
        return z / (c * safe), jnp.sum(z * jnp.log(safe)) / c, state


def famo_update(state: FamoState, losses, tx: optax.GradientTransformation) -> FamoState:
    """One FAMO step of the task logits from the drop of ``log L`` since the previous step (none at the first)."""
    log_l = jnp.log(losses + 1e-8)
    _, pullback = jax.vjp(jax.nn.softmax, state.logits)
    (grad,) = pullback(state.prev - log_l)
    updates, opt = tx.update(grad, state.opt, state.logits)
    moved = (optax.apply_updates(state.logits, updates), opt)
    logits, opt = jax.tree.map(lambda a, b: jnp.where(state.started, a, b), moved, (state.logits, state.opt))
    return FamoState(logits, opt, log_l, jnp.ones((), bool))
