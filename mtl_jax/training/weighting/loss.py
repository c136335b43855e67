"""The loss methods without running state: ``sum``, ``static``, ``uncertainty``.

- ``sum``: weight 1 per task (the summed loss);
- ``static``: each task's ``weight`` from the config;
- ``uncertainty``: Kendall, Gal & Cipolla (2018), classification form: a learned
  log-variance ``s_t`` per task, loss ``sum_t exp(-s_t) * L_t + s_t / 2``; the ``s_t`` live in
  ``params["loss_weights"]`` and train with the heads;
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtl_jax.training.weighting.base import Method, register


@register("sum")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sum(Method):
    """Every task's mean loss with weight 1."""

    about = "every task's mean loss, weight 1"


@register("static")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Static(Method):
    """Each task's mean loss times its config ``weight``."""

    about = "each task's config weight"

    def weights(self, state, losses, present, key):
        w = jnp.asarray(self.task_weights, jnp.float32)
        return w, jnp.sum(w * losses), state


@register("uncertainty")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Uncertainty(Method):
    """Learned log-variances: the terms are ``exp(-s_t) L_t + s_t / 2``, weighted 1."""

    about = "learned (Kendall et al. 2018)"

    def add_params(self, params: dict, tasks) -> dict:
        return params | {"loss_weights": {t: jnp.zeros((), jnp.float32) for t in tasks}}

    def terms(self, params, means, present, tasks, share: float = 1.0) -> jax.Array:
        log_vars = jnp.stack([params["loss_weights"][t] for t in tasks])
        return uncertainty_terms(means, present, log_vars, share)


def uncertainty_terms(means, present, log_vars, share: float = 1.0) -> jax.Array:
    """``exp(-s_t) * L_t + share * s_t / 2`` per task ``[T]`` (``share``: a micro-batch's part of the
    batch); a task absent from the batch adds nothing, not even its ``s_t / 2`` (else the
    regulariser alone would push ``s_t`` down on every batch of the other tasks)."""
    return present * (jnp.exp(-log_vars) * means + share * 0.5 * log_vars)
