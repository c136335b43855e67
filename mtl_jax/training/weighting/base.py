"""The loss-weighting method interface, its registry, and what every method shares."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.config import WeightingConfig
from mtl_jax.registry import registrar

REGISTRY: dict[str, type[Method]] = {}


class NoState(NamedTuple):
    """The state of a method that keeps none."""


register = registrar(REGISTRY, "name")  # @register("name"): the method ``--loss-weighting name``


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """A loss-weighting method. Subclasses set what they need and override ``weights`` (loss
    methods) or ``combine`` (gradient methods); every function is pure."""

    name: ClassVar[str] = ""
    every_task: ClassVar[bool] = False  # every step holds every task (task-stacked batches)
    uses_task_grads: ClassVar[bool] = False  # combine() on per-task gradients
    weights_from_losses: ClassVar[bool] = False  # its weights need this batch's losses before the backward pass
    task_weights: tuple[float, ...] = ()  # the tasks' config weights (``static``)

    @classmethod
    def from_config(cls, cfg: WeightingConfig, task_weights: tuple[float, ...] = ()) -> Method:
        """The method with its hyperparameters from ``cfg`` (the fields its class declares)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"task_weights"}
        return cls(task_weights=tuple(task_weights), **{n: getattr(cfg, n) for n in names})

    def init(self, n_tasks: int) -> NamedTuple:
        """The method's running state for ``n_tasks`` tasks."""
        return NoState()

    def add_params(self, params: dict, tasks) -> dict:
        """``params`` plus what the method learns with the model (none by default)."""
        return params

    def terms(self, params, means, present, tasks, share: float = 1.0) -> jax.Array:
        """The per-task loss terms ``[T]`` (``tasks``' order) the weights multiply, from the mean losses
        (the means themselves by default); ``share``: a micro-batch's part of the batch."""
        return means

    def weights(self, state, losses, present, key) -> tuple[jax.Array, jax.Array, NamedTuple]:
        """``(weights [T], loss, new state)``: the backward pass runs with ``d loss / d L_t = weights_t``.

        ``losses``: the tasks' mean losses ``[T]`` (0 where absent); ``present``: 1/0 per task.
        """
        w = jnp.ones(losses.shape, jnp.float32)
        return w, jnp.sum(w * losses), state

    def combine(self, state, losses, task_grads, shared, key) -> tuple[dict, jax.Array, jax.Array, NamedTuple]:
        """``(grads, task coefficients [T], loss, new state)`` from per-task gradients (gradient methods)."""
        raise NotImplementedError(f"{self.name} weights losses; it does not combine per-task gradients")


def make(cfg: WeightingConfig | str = "sum", task_weights=(), **hyper) -> Method:
    """The method ``cfg.method`` (or the name given), its hyperparameters from ``cfg`` and ``hyper``."""
    if isinstance(cfg, str):
        cfg = WeightingConfig(method=cfg)
    cfg = dataclasses.replace(cfg, **hyper)
    if cfg.method not in REGISTRY:
        raise ValueError(f"unknown loss weighting {cfg.method!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[cfg.method].from_config(cfg, task_weights)


def mean_losses(per_task: dict, tasks, counts=None) -> tuple[jax.Array, jax.Array]:
    """Per task (in ``tasks``' order): mean loss over its labelled rows (0 when none) ``[T]``, and 1/0 present ``[T]``.

    ``counts`` [T]: the denominators instead of the rows here (a micro-batch: the whole batch's).
    """
    if counts is None:
        counts = jnp.stack([per_task[t]["count"] for t in tasks]).astype(jnp.float32)
    means = jnp.stack([per_task[t]["loss_sum"] for t in tasks]) / jnp.maximum(counts, 1)
    return means, (counts > 0).astype(jnp.float32)
