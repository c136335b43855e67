"""The pure, jit-compiled steps: train, eval, embed and the task-gradient probe.

The train state is a plain pytree; ``train_step`` is one ``jax.jit`` of top-level pure
functions with the state donated. A :class:`StepSpec` holds what is fixed for a compiled
step (the model, the optimizer, the loss-weighting method, which parameters are frozen).
The loss is the weighted sum over tasks of each task's mean loss over the slots (tokens) that
carry its label (see :meth:`mtl_jax.tasks.Task.present`). Metrics come back as device arrays and are only fetched by
the host when logged. :func:`build_train_step` makes an optimizer and its step from a run's
settings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from mtl_jax.data.batching import Batch, TokenBatch, micro_batches
from mtl_jax.model.multitask import MultiTaskModel
from mtl_jax.tasks import Task
from mtl_jax.tasks.base import LossSums
from mtl_jax.training.freezing import encoder_frozen, param_groups
from mtl_jax.training.gradcache import chunked_outputs
from mtl_jax.training.optim import OptimConfig, make_optimizer
from mtl_jax.training.weighting import Method, cosine_matrix, make, mean_losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    nonfinite: jax.Array = None  # int32 scalar: consecutive non-finite steps so far
    weighting: Any = None  # the loss-weighting method's running state (see Method.init)

    @classmethod
    def create(cls, params, opt_state, weighting=None) -> TrainState:
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (two buffers: both are donated)
        return cls(zero(), params, opt_state, zero(), () if weighting is None else weighting)


class TaskMetrics(NamedTuple):
    """A task's sums over a train step's labelled rows, and the weight its loss had."""

    loss_sum: jax.Array  # float32
    correct: jax.Array  # int32
    count: jax.Array  # int32
    weight: jax.Array  # float32


class StepTotals(NamedTuple):
    """Train-step metrics summed since the last training record (device arrays: fetched when logged)."""

    loss: jax.Array  # float32: the summed (weighted) loss
    steps: jax.Array  # int32: steps that updated
    skipped: jax.Array  # int32: steps skipped for a non-finite loss or gradient
    tasks: dict[str, TaskMetrics]


class StepMetrics(NamedTuple):
    """What one train step returns besides the state: its totals and the non-finite streak."""

    totals: StepTotals
    streak: jax.Array  # int32: consecutive non-finite steps, this one included


class Probe(NamedTuple):
    """Task-gradient diagnostics of one probe batch (``[T]``, ``[T]``, ``[T, T]``)."""

    loss: jax.Array
    grad_norm: jax.Array
    cosine: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """What a compiled train step is made of (fixed for one freezing phase)."""

    model: MultiTaskModel
    tasks: tuple[Task, ...]  # the model's tasks, in its heads' order
    tx: optax.GradientTransformation | None = None
    method: Method = dataclasses.field(default_factory=make)
    frozen_mask: Any = None  # a tree of bools like the params: True where frozen
    encoder_frozen: bool = False  # the whole encoder frozen: it runs without dropout
    grad_accum: int = 1
    chunks: int = 1  # gradient caching: each (micro-)batch's encoder pass in this many chunks (gradcache.py)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)


# ---------------------------------------------------------------------------- losses


def task_losses(outputs: dict[str, jax.Array], labels: dict, tasks: Sequence[Task]) -> dict[str, LossSums]:
    """Per task: its summed loss, correct count and example count over labelled rows (slots, tokens)."""
    return {task.name: task.loss_sums(outputs[task.name], labels[task.name]) for task in tasks}


def model_variables(params) -> dict:
    """The model's variables from a params tree that may also hold ``loss_weights``."""
    return {"params": {k: params[k] for k in ("encoder", "heads", "guide") if k in params}}


def forward(
    model: MultiTaskModel, params, batch: Batch, key=None, encoder_frozen: bool = False, chunks: int = 1
) -> dict[str, jax.Array]:
    """Each head's outputs (logits, cosines, embeddings: per slot ``[R, S, ...]`` or token ``[R, P, ...]``)
    of a batch: packed token rows, or cached pooled embeddings (see
    :mod:`mtl_jax.data.batching`).

    With a ``key`` dropout is on (training), except inside a frozen encoder, which runs
    as a fixed feature extractor: that is what makes its embeddings cacheable. ``chunks`` > 1: a
    training encoder pass in that many chunks, re-run in the backward pass (:mod:`mtl_jax.training.gradcache`).
    """
    train = key is not None
    if chunks > 1 and train and not encoder_frozen and isinstance(batch, TokenBatch):
        return chunked_outputs(model, model_variables(params), batch, chunks, key)
    rngs = {"dropout": key} if train else {}
    return batch.outputs(model, model_variables(params), not train, encoder_frozen or not train, rngs)


def loss_terms(spec: StepSpec, params, batch, key, counts=None, share: float = 1.0):
    """``(terms [T], per-task sums)``; ``key=None``: no dropout.

    ``terms``: each task's mean loss over its labelled rows (0 where it has none), as the
    weighting method shapes them (``uncertainty``: ``exp(-s_t) L_t + s_t / 2``). A micro-batch of
    gradient accumulation passes the whole batch's label ``counts`` [T] as the means'
    denominators and its ``share`` of the per-batch terms, so the micro-batches' terms add up
    to the batch's.
    """
    outputs = forward(spec.model, params, batch, key, spec.encoder_frozen, spec.chunks)
    per_task = task_losses(outputs, batch.labels, spec.tasks)
    means, present = mean_losses(per_task, spec.names, counts)
    return spec.method.terms(params, means, present, spec.names, share), per_task


def make_loss_fn(model: MultiTaskModel, tasks: Sequence[Task], method: Method | None = None) -> Callable:
    """``loss_fn(params, batch, key, counts=None, share=1.0) -> (terms [T], per-task sums)`` (see :func:`loss_terms`)."""
    return functools.partial(loss_terms, StepSpec(model, tuple(tasks), method=method or make()))


def summed(loss_fn: Callable) -> Callable:
    """``loss_fn`` with its per-task terms summed: a scalar loss, the terms kept in the aux output."""

    def scalar(params, batch, key):
        terms, aux = loss_fn(params, batch, key)
        return terms.sum(), aux

    return scalar


# ---------------------------------------------------------------------------- batches


def own_task_labels(labels: dict, t, tasks: Sequence[Task]) -> dict:
    """Keeps only task ``t``'s labels (the others' become their "no label"): sub-batch ``t`` of a
    task-stacked batch."""
    return {task.name: jnp.where(t == i, labels[task.name], task.batch_no_label) for i, task in enumerate(tasks)}


def task_stacked_flat(batch: Batch, tasks: Sequence[Task]) -> Batch:
    """A task-stacked batch (arrays ``[rows, T, ...]``) as one plain batch ``[rows * T, ...]``, each
    sub-batch keeping only its own task's labels (as in :func:`per_task_grads`)."""
    own = functools.partial(own_task_labels, tasks=tasks)
    labels = jax.vmap(own, in_axes=(1, 0), out_axes=1)(batch.labels, jnp.arange(len(tasks)))
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), batch.replace(labels=labels))


def label_counts(labels: dict, tasks: Sequence[Task]) -> jax.Array:
    """Each task's loss denominator (labelled slots or tokens) ``[T]`` (float32) of a batch's labels."""
    return jnp.stack([task.count(labels[task.name]) for task in tasks]).astype(jnp.float32)


def accumulated(fn: Callable, batch: Batch, key, k: int):
    """``fn(batch, key)``'s pytree of sums, over ``k`` micro-batches of ``batch`` (one ``lax.scan``; ``k = 1``: one call)."""
    if k == 1:
        return fn(batch, key)
    micro = micro_batches(batch, k)
    first = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(total, xs):
        mb, i = xs
        sub_key = None if key is None else jax.random.fold_in(key, i)
        return jax.tree.map(jnp.add, total, fn(mb, sub_key)), None

    return jax.lax.scan(body, zeros, (micro, jnp.arange(k)))[0]


# ---------------------------------------------------------------------------- gradients


def per_task_grads(loss_fn: Callable, params, stacked, key, tasks: Sequence[Task]):
    """Each task's loss and gradient from its own sub-batch, in one vmapped pass.

    ``stacked`` holds arrays ``[rows, T, ...]`` (sub-batch ``t`` = ``stacked[:, t]``);
    ``loss_fn(params, batch, key) -> (loss, aux)``. Returns ``((loss [T], aux [T, ...]), grads [T, ...])``.
    """
    n = len(tasks)

    def value_and_grad(t, sub):
        sub = sub.replace(labels=own_task_labels(sub.labels, t, tasks))
        sub_key = None if key is None else jax.random.fold_in(key, t)
        return jax.value_and_grad(loss_fn, has_aux=True)(params, sub, sub_key)

    return jax.vmap(value_and_grad, in_axes=(0, 1))(jnp.arange(n), stacked)


def combined_task_grads(spec: StepSpec, params, wstate, batch, key, wkey):
    """A gradient method's step: every task's gradient on its own sub-batch (accumulated over the
    micro-batches), combined by the method on the encoder's trainable part.
    Returns ``(loss, per-task sums, task coefficients [T], new weighting state), grads``."""
    k = spec.grad_accum
    counts = label_counts(task_stacked_flat(batch, spec.tasks).labels, spec.tasks) if k > 1 else None
    micro_loss = summed(lambda p, b, key: loss_terms(spec, p, b, key, counts, 1.0 / k))

    def task_grads_of(mb, key):
        (losses, per_task), task_grads = per_task_grads(micro_loss, params, mb, key, spec.tasks)
        return losses, per_task, task_grads

    losses, per_task, task_grads = accumulated(task_grads_of, batch, key, k)
    shared = None
    if not spec.encoder_frozen:  # combined over the encoder's trainable part (frozen grads are never computed)
        shared = task_grads["encoder"]
        if spec.frozen_mask is not None:
            shared = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, shared, spec.frozen_mask["encoder"])
    grads, coef, loss, wstate = spec.method.combine(wstate, losses, task_grads, shared, wkey)
    return (loss, jax.tree.map(lambda x: x.sum(0), per_task), coef, wstate), grads


def weighted_grads(spec: StepSpec, params, wstate, batch, key, wkey):
    """A loss method's step, one batch: the weights between the forward and the backward pass.
    Returns ``(loss, per-task sums, weights [T], new weighting state), grads``."""
    terms, pullback, per_task = jax.vjp(lambda p: loss_terms(spec, p, batch, key), params, has_aux=True)
    _, present = mean_losses(per_task, spec.names)
    w, loss, wstate = spec.method.weights(wstate, terms, present, wkey)
    (grads,) = pullback(jax.lax.stop_gradient(w))
    return (loss, per_task, w, wstate), grads


def weighted_grads_accumulated(spec: StepSpec, params, wstate, batch, key, wkey):
    """:func:`weighted_grads` over ``grad_accum`` micro-batches: the weights come first, from the
    state alone or (``weights_from_losses``) from a forward pass over the micro-batches; the
    state moves on with the batch's losses after the backward passes."""
    k = spec.grad_accum
    counts = label_counts(batch.labels, spec.tasks)
    present = (counts > 0).astype(jnp.float32)
    micro_terms = lambda p, mb, key: loss_terms(spec, p, mb, key, counts, 1.0 / k)  # noqa: E731
    known = None
    if spec.method.weights_from_losses:
        known = accumulated(lambda mb, key: micro_terms(params, mb, key)[0], batch, key, k)
    first = jnp.zeros(len(spec.tasks)) if known is None else known
    w, loss, new_state = spec.method.weights(wstate, first, present, wkey)

    def grads_of(mb, key):
        terms, pullback, per_task = jax.vjp(lambda p: micro_terms(p, mb, key), params, has_aux=True)
        return pullback(jax.lax.stop_gradient(w))[0], terms, per_task

    grads, terms, per_task = accumulated(grads_of, batch, key, k)
    if known is None:
        _, loss, new_state = spec.method.weights(wstate, terms, present, wkey)
    return (loss, per_task, w, new_state), grads


def loss_and_grads(spec: StepSpec, params, wstate, batch, key):
    """``(loss, per-task sums, task weights [T], new weighting state), grads`` as the method needs them."""
    wkey = jax.random.fold_in(key, 1 << 20)
    if spec.method.uses_task_grads:
        return combined_task_grads(spec, params, wstate, batch, key, wkey)
    if spec.method.every_task:
        batch = task_stacked_flat(batch, spec.tasks)
    if spec.grad_accum == 1:
        return weighted_grads(spec, params, wstate, batch, key, wkey)
    return weighted_grads_accumulated(spec, params, wstate, batch, key, wkey)


# ---------------------------------------------------------------------------- the update


def is_finite(spec: StepSpec, loss, grads) -> jax.Array:
    """The loss and the gradient of what trains are finite (frozen grads are not read: reading them
    would keep their backward pass alive)."""
    mask = spec.frozen_mask if spec.frozen_mask is not None else jax.tree.map(lambda _: False, grads)
    trained = [g for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if not f]
    return jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(trained))


def guarded_update(spec: StepSpec, state: TrainState, grads, wstate, finite):
    """``(params, opt_state, weighting state)`` after the update, or as they were when not ``finite``.

    Frozen parameters keep their values bit for bit (``p + 0`` would turn -0.0 into +0.0). A cond,
    not a select: selecting after the update costs a full extra pass over the state.
    """

    def update(operands):
        grads, params, opt_state, _, wstate = operands
        updates, new_opt_state = spec.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if spec.frozen_mask is not None:
            new_params = jax.tree.map(lambda f, old, new: old if f else new, spec.frozen_mask, params, new_params)
        return new_params, new_opt_state, wstate

    operands = (grads, state.params, state.opt_state, state.weighting, wstate)
    return jax.lax.cond(finite, update, lambda ops: ops[1:4], operands)


def train_step(spec: StepSpec, state: TrainState, batch, rng):
    """``(state, metrics)`` after one step on ``batch``; a non-finite loss or gradient skips the update."""
    key = jax.random.fold_in(rng, state.step)
    (loss, per_task, task_w, wstate), grads = loss_and_grads(spec, state.params, state.weighting, batch, key)
    finite = is_finite(spec, loss, grads)
    params, opt_state, wstate = guarded_update(spec, state, grads, wstate, finite)
    streak = jnp.where(finite, 0, state.nonfinite + 1)
    per_task = {t: TaskMetrics(*per_task[t], task_w[i]) for i, t in enumerate(spec.names)}
    totals = StepTotals(
        jnp.where(finite, loss, 0.0),
        finite.astype(jnp.int32),
        1 - finite.astype(jnp.int32),
        jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), per_task),
    )
    return TrainState(state.step + 1, params, opt_state, streak, wstate), StepMetrics(totals, streak)


def make_train_step(
    model: MultiTaskModel,
    tx: optax.GradientTransformation,
    weighting: Method | None = None,
    frozen_mask=None,
    encoder_frozen: bool = False,
    grad_accum: int = 1,
    chunks: int = 1,
    *,
    tasks: Sequence[Task],
) -> Callable:
    """``train_step(state, batch, rng) -> (state, StepMetrics)``, jitted with the state donated.

    ``weighting`` (default ``sum``, see :mod:`mtl_jax.training.weighting`); methods with
    ``every_task`` need a task-stacked batch (arrays ``[rows, T, ...]``). A batch may hold token
    ids or cached embeddings (``"embeddings"``); each kind compiles its own shapes.
    ``grad_accum`` K: the gradient is summed over K micro-batches of the batch's rows (its
    memory is one micro-batch's), equal to the whole batch's. ``chunks`` C: each micro-batch's encoder
    pass in C chunks, re-run in the backward pass (gradient caching: the loss still sees the whole batch).
    """
    spec = StepSpec(model, tuple(tasks), tx, weighting or make(), frozen_mask, encoder_frozen, grad_accum, chunks)
    return jax.jit(functools.partial(train_step, spec), donate_argnums=0)


def frozen_param_mask(params, frozen: frozenset[str]):
    """A tree of bools like ``params``: True where the parameter's group is frozen."""
    return jax.tree.map(lambda g: g in frozen, param_groups(params))


def build_train_step(
    model: MultiTaskModel,
    params,
    frozen: frozenset[str],
    optim: OptimConfig,
    weighting: Method | None = None,
    grad_accum: int = 1,
    chunks: int = 1,
    *,
    tasks: Sequence[Task],
):
    """``(tx, train_step)`` for one freezing phase: the trainer, the benchmarks and the tests build it here.

    A fully frozen encoder runs without dropout (a fixed feature extractor, so its
    embeddings can be cached).
    """
    groups = set(jax.tree.leaves(param_groups(params)))
    tx = make_optimizer(params, frozen, optim, model.config.n_layers)
    mask = frozen_param_mask(params, frozen)
    frozen_encoder = encoder_frozen(frozen, groups)
    return tx, make_train_step(model, tx, weighting, mask, frozen_encoder, grad_accum, chunks, tasks=tasks)


# ---------------------------------------------------------------------------- evaluation and probes


def make_eval_step(model: MultiTaskModel, tasks: Sequence[Task]) -> Callable:
    """``eval_step(params, batch) -> ({task: predictions per slot [R, S, ...] or token [R, P]}, {task: LossSums})``."""
    tasks = tuple(tasks)

    @jax.jit
    def eval_step(params, batch):
        outputs = forward(model, params, batch)
        per_task = task_losses(outputs, batch.labels, tasks)
        preds = {t.name: t.predict(outputs[t.name]) for t in tasks}
        return preds, per_task

    return eval_step


def make_embed_step(model: MultiTaskModel) -> Callable:
    """``embed_step(params, batch) -> pooled [R, S, D]`` of a packed batch: the encoder alone, no dropout."""

    @jax.jit
    def embed_step(params, batch: TokenBatch):
        pooled = model.apply(
            model_variables(params),
            batch.ids,
            batch.positions,
            batch.segments,
            batch.num_segments,
            method=MultiTaskModel.embed_packed,
        )
        return pooled

    return embed_step


def make_grad_probe(model: MultiTaskModel, tasks: Sequence[Task]) -> Callable:
    """``probe(params, stacked) -> Probe``: task-gradient diagnostics.

    Each task's gradient of its mean loss over its own sub-batch of the task-stacked
    ``stacked`` (no dropout), measured on the shared encoder.
    """
    tasks = tuple(tasks)
    loss_fn = summed(make_loss_fn(model, tasks))

    @jax.jit
    def probe(params, stacked):
        (losses, _), grads = per_task_grads(loss_fn, params, stacked, None, tasks)
        norms, cosine = cosine_matrix(grads["encoder"])
        return Probe(losses, norms, cosine)

    return probe


def zero_metrics(tasks: Sequence[str]) -> StepTotals:
    """The running sums a train step's totals add into (see :func:`accumulate`)."""
    f, i = (lambda: jnp.zeros((), jnp.float32)), (lambda: jnp.zeros((), jnp.int32))
    return StepTotals(f(), i(), i(), {t: TaskMetrics(f(), i(), i(), f()) for t in tasks})


@jax.jit
def accumulate(total: StepTotals, metrics: StepMetrics) -> StepTotals:
    """Adds a step's totals into the running sums, on the device (no host sync)."""
    return jax.tree.map(jnp.add, total, metrics.totals)
