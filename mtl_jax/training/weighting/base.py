"""The loss-weighting method interface, its registry, and what every method shares.

A method's options are its own fields, declared with :func:`mtl_jax.options.option`; the flag of
option ``lr`` of method ``famo`` is ``--famo-lr`` (config key ``famo_lr``), derived by
:mod:`mtl_jax.config`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from mtl_jax.options import declared
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
    about: ClassVar[str] = ""  # a few words for --loss-weighting's help
    every_task: ClassVar[bool] = False  # every step holds every task (task-stacked batches)
    uses_task_grads: ClassVar[bool] = False  # combine() on per-task gradients
    weights_from_losses: ClassVar[bool] = False  # its weights need this batch's losses before the backward pass
    task_weights: tuple[float, ...] = ()  # the tasks' config weights (``static``)

    def with_epoch_length(self, steps: int) -> Method:
        """The method for a run of ``steps`` per epoch (what it does per epoch: DWA's period)."""
        return self

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


def make(name: str = "sum", task_weights=(), **options) -> Method:
    """The method registered as ``name`` with its ``options`` (the others at their defaults), named as
    the method declares them (``lr``) or as the flags do (``famo_lr``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown loss weighting {name!r}; choose from {', '.join(REGISTRY)}")
    options = {k.removeprefix(f"{name}_"): v for k, v in options.items()}
    return REGISTRY[name](task_weights=tuple(task_weights), **options)


def flat_options(values: Mapping[str, Any], name: str) -> dict:
    """Method ``name``'s options out of flat config values (``famo_lr`` is famo's ``lr``)."""
    return {f.name: values[f"{name}_{f.name}"] for f in declared(REGISTRY[name]) if f"{name}_{f.name}" in values}


def mean_losses(per_task: dict, tasks, counts=None) -> tuple[jax.Array, jax.Array]:
    """Per task (in ``tasks``' order): mean loss over its labelled rows (0 when none) ``[T]``, and 1/0 present ``[T]``.

    ``counts`` [T]: the denominators instead of the rows here (a micro-batch: the whole batch's).
    """
    if counts is None:
        counts = jnp.stack([per_task[t].count for t in tasks]).astype(jnp.float32)
    means = jnp.stack([per_task[t].loss_sum for t in tasks]) / jnp.maximum(counts, 1)
    return means, (counts > 0).astype(jnp.float32)
