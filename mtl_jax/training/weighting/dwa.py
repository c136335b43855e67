"""``dwa``: Dynamic Weight Average, Liu, Johns & Davison (2019).

``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the mean training
losses of the last two periods (weight 1 in the first two); a period is an epoch as in the
paper (the trainer's default), or ``dwa_period`` steps.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mtl_jax.options import AT_LEAST_1, POSITIVE, option
from mtl_jax.training.weighting.base import Method, register


class DwaState(NamedTuple):
    sum: jax.Array  # [T] this period's loss sums
    count: jax.Array  # [T] and the steps that held each task
    history: jax.Array  # [2, T] the last two finished periods' mean losses
    periods: jax.Array  # int32: periods finished
    steps: jax.Array  # int32: steps of this period so far


@register("dwa")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Dwa(Method):
    about = "Dynamic Weight Average (Liu et al. 2019)"
    temperature: float = option(2.0, "softmax temperature over the tasks' loss ratios", POSITIVE)
    period: Optional[int] = option(
        None, "steps over which each task's training loss is averaged (default: one epoch, as in the paper)", AT_LEAST_1
    )

    def with_epoch_length(self, steps: int) -> Dwa:
        return self if self.period is not None else dataclasses.replace(self, period=steps)

    def init(self, n_tasks: int) -> DwaState:
        # (a fresh array per field: the train state is donated, and one buffer may not be donated twice)
        zeros = lambda: jnp.zeros((n_tasks,), jnp.float32)  # noqa: E731
        count = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
        return DwaState(zeros(), zeros(), jnp.ones((2, n_tasks), jnp.float32), count(), count())

    def weights(self, state, losses, present, key):
        w = dwa_weights(state.history, state.periods, self.temperature)
        return w, jnp.sum(w * losses), dwa_update(state, losses, present, self.period or 1)


def dwa_weights(history, periods, temperature: float) -> jax.Array:
    """``T softmax(r / temperature)``, ``r = history[1] / history[0]``; ones before two periods have finished."""
    r = history[1] / jnp.maximum(history[0], 1e-20)
    w = history.shape[1] * jax.nn.softmax(r / temperature)
    return jnp.where(periods >= 2, w, jnp.ones_like(w))


def dwa_update(state: DwaState, losses, present, period: int) -> DwaState:
    """Adds a step's losses to the period's sums; the period's last step moves the history on."""
    total, count, steps = state.sum + losses * present, state.count + present, state.steps + 1
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1), state.history[1])  # (an absent task keeps its last)
    rolled = DwaState(
        jnp.zeros_like(total),
        jnp.zeros_like(count),
        jnp.stack([state.history[1], mean]),
        state.periods + 1,
        jnp.zeros_like(steps),
    )
    going = DwaState(total, count, state.history, state.periods, steps)
    return jax.tree.map(lambda a, b: jnp.where(steps >= period, a, b), rolled, going)
