"""The pure, jit-compiled steps: train, eval, embed and the task-gradient probe.

The train state is a plain pytree; ``train_step`` is one ``jax.jit`` with the state
donated. The loss is the weighted sum over tasks of the mean cross-entropy over the
examples that carry that task's label (``-1``: no label). Metrics come back as
device arrays and are only fetched by the host when logged. :func:`build_train_step`
is the one place an optimizer and its train step are made from a run's config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mtl_jax.model.multitask import MultiTaskModel
from mtl_jax.training.freezing import encoder_frozen, param_groups
from mtl_jax.training.optim import OptimConfig, make_optimizer
from mtl_jax.training.weighting import GRADIENT_METHODS, Weighting, cosine_matrix, mean_losses, uncertainty_terms


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    nonfinite: jax.Array = None  # int32 scalar: consecutive non-finite steps so far
    weighting: Any = None  # the loss-weighting method's running state (see Weighting.init_state)

    @classmethod
    def create(cls, params, opt_state, weighting: dict | None = None) -> TrainState:
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (two buffers: both are donated)
        return cls(zero(), params, opt_state, zero(), {} if weighting is None else weighting)


def task_losses(logits: dict[str, jax.Array], labels: jax.Array, tasks: Sequence[str]) -> dict[str, jax.Array]:
    """Per task: summed cross-entropy, correct count and example count over labelled rows (slots)."""
    labels = labels.reshape(-1, labels.shape[-1])  # packed [R, S, T]: one row per slot
    out = {}
    for t, name in enumerate(tasks):
        y = labels[:, t]  # [B], -1: no label
        valid = y >= 0
        logp = jax.nn.log_softmax(logits[name].astype(jnp.float32))  # [B, C]
        nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
        out[name] = {
            "loss_sum": jnp.sum(jnp.where(valid, nll, 0.0)),
            "correct": jnp.sum(valid & (jnp.argmax(logp, axis=-1) == y)),
            "count": jnp.sum(valid),
        }
    return out


def model_variables(params) -> dict:
    """The model's variables from a params tree that may also hold ``loss_weights``."""
    return {"params": {k: params[k] for k in ("encoder", "heads") if k in params}}


def forward(model: MultiTaskModel, params, batch, key=None, encoder_frozen: bool = False) -> dict[str, jax.Array]:
    """Logits ``[R * S, C]`` of a packed batch (see :mod:`mtl_jax.data.batching`), or ``[B, C]`` of
    cached pooled embeddings (``batch["embeddings"]``).

    With a ``key`` dropout is on (training), except inside a frozen encoder, which runs
    as a fixed feature extractor: that is what makes its embeddings cacheable.
    """
    train = key is not None
    rngs = {"dropout": key} if train else {}
    if "embeddings" in batch:
        return model.apply(
            model_variables(params),
            batch["embeddings"],
            deterministic=not train,
            rngs=rngs,
            method=MultiTaskModel.classify,
        )
    return model.apply(
        model_variables(params),
        batch["ids"],
        batch["positions"],
        batch["segments"],
        batch["labels"].shape[-2],
        deterministic=not train,
        encoder_deterministic=encoder_frozen or not train,
        rngs=rngs,
        method=MultiTaskModel.classify_packed,
    )


def own_task_labels(labels: jax.Array, t) -> jax.Array:
    """Keeps only task ``t``'s label column (the others become -1): sub-batch ``t`` of a task-stacked batch."""
    return jnp.where(jnp.arange(labels.shape[-1]) == t, labels, -1)


def per_task_grads(loss_fn: Callable, params, stacked, key):
    """Each task's loss and gradient from its own sub-batch, in one vmapped pass.

    ``stacked`` holds arrays ``[rows, T, ...]`` (sub-batch ``t`` = ``stacked[:, t]``);
    ``loss_fn(params, batch, key) -> (loss, aux)``. Returns ``((loss [T], aux [T, ...]), grads [T, ...])``.
    """
    n = next(iter(stacked.values())).shape[1]

    def value_and_grad(t, sub):
        sub = dict(sub, labels=own_task_labels(sub["labels"], t))
        sub_key = None if key is None else jax.random.fold_in(key, t)
        return jax.value_and_grad(loss_fn, has_aux=True)(params, sub, sub_key)

    return jax.vmap(value_and_grad, in_axes=(0, 1))(jnp.arange(n), stacked)


def task_stacked_flat(batch: dict) -> dict:
    """A task-stacked batch (arrays ``[rows, T, ...]``) as one plain batch ``[rows * T, ...]``, each
    sub-batch keeping only its own task's labels (as in :func:`per_task_grads`)."""
    n = batch["labels"].shape[1]
    labels = jax.vmap(own_task_labels, in_axes=(1, 0), out_axes=1)(batch["labels"], jnp.arange(n))
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in dict(batch, labels=labels).items()}


def make_loss_fn(model: MultiTaskModel, encoder_frozen: bool = False, uncertainty: bool = False) -> Callable:
    """``loss_fn(params, batch, key, counts=None, share=1.0) -> (terms [T], per-task sums)``; ``key=None``: no dropout.

    ``terms``: each task's mean loss over its labelled rows (0 where it has none); with
    ``uncertainty``, Kendall et al.'s ``exp(-s_t) L_t + s_t / 2`` (``s`` in ``params["loss_weights"]``).
    A micro-batch of gradient accumulation passes the whole batch's label ``counts`` [T] as the
    means' denominators and its ``share`` of the per-batch terms, so that the micro-batches' terms
    add up to the batch's.
    """
    tasks = [name for name, _ in model.tasks]

    def loss_fn(params, batch, key, counts=None, share=1.0):
        per_task = task_losses(forward(model, params, batch, key, encoder_frozen), batch["labels"], tasks)
        means, present = mean_losses(per_task, tasks, counts)
        if uncertainty:
            log_vars = jnp.stack([params["loss_weights"][t] for t in tasks])
            means = uncertainty_terms(means, present, log_vars, share)
        return means, per_task

    return loss_fn


def label_counts(labels: jax.Array) -> jax.Array:
    """Labelled rows per task ``[T]`` (float32) of a batch's labels ``[..., T]``."""
    return jnp.sum(labels.reshape(-1, labels.shape[-1]) >= 0, axis=0).astype(jnp.float32)


def micro_batches(batch: dict, k: int) -> dict:
    """The batch as ``k`` micro-batches (arrays ``[k, rows / k, ...]``): row ``r`` goes to micro-batch
    ``r % k``, so each device's rows split evenly over the micro-batches. Cached embeddings
    (``[rows * S, ...]``) follow their rows."""
    rows = batch["labels"].shape[0]

    def split(x):
        per_row = x.reshape((rows, -1) + x.shape[1:]) if x.shape[0] != rows else x
        y = jnp.moveaxis(per_row.reshape((rows // k, k) + per_row.shape[1:]), 1, 0)
        return y.reshape((k, -1) + x.shape[1:]) if x.shape[0] != rows else y

    return {name: split(x) for name, x in batch.items()}


def accumulated(fn: Callable, batch: dict, key, k: int):
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


def summed(loss_fn: Callable) -> Callable:
    """``loss_fn`` with its per-task terms summed: a scalar loss, the terms kept in the aux output."""

    def scalar(params, batch, key):
        terms, aux = loss_fn(params, batch, key)
        return terms.sum(), aux

    return scalar


def make_train_step(
    model: MultiTaskModel,
    tx: optax.GradientTransformation,
    weights: dict[str, float],
    frozen_mask=None,
    weighting: str | Weighting = "static",
    encoder_frozen: bool = False,
    grad_accum: int = 1,
) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, jitted with the state donated.

    ``weighting`` (see :mod:`mtl_jax.training.weighting`): ``static`` uses ``weights``; the loss
    methods weight each task's mean loss between one forward and one backward pass; the
    gradient methods (and ``famo``) need a task-stacked batch (arrays ``[rows, T, ...]``).
    A batch may hold token ids or cached embeddings (``"embeddings"``); each kind compiles
    its own shapes. ``frozen_mask`` (a tree of bools like the params) keeps frozen
    parameters as they were, bit for bit (``p + 0`` would turn -0.0 into +0.0).
    ``grad_accum`` K: the gradient is summed over K micro-batches of the batch's rows (its
    memory is one micro-batch's), equal to the whole batch's; ``famo``, whose weights need the
    batch's losses first, then runs a forward pass over the micro-batches before them.
    """
    method = weighting if isinstance(weighting, Weighting) else Weighting(weighting)
    tasks = [name for name, _ in model.tasks]
    static = jnp.asarray([weights[t] for t in tasks], jnp.float32) if method.method == "static" else None
    loss_fn = make_loss_fn(model, encoder_frozen, uncertainty=method.method == "uncertainty")

    k = grad_accum
    share = 1.0 / k

    def loss_and_grads(params, wstate, batch, key):
        """``(loss, per-task sums, task weights [T], new weighting state), grads``."""
        wkey = jax.random.fold_in(key, 1 << 20)
        if method.method in GRADIENT_METHODS:
            counts = label_counts(task_stacked_flat(batch)["labels"]) if k > 1 else None
            micro_loss = summed(lambda p, b, key: loss_fn(p, b, key, counts, share))

            def task_grads_of(mb, key):
                (losses, per_task), task_grads = per_task_grads(micro_loss, params, mb, key)
                return losses, per_task, task_grads

            losses, per_task, task_grads = accumulated(task_grads_of, batch, key, k)
            shared = None
            if not encoder_frozen:  # combined over the encoder's trainable part (frozen grads are never computed)
                shared = task_grads["encoder"]
                if frozen_mask is not None:
                    shared = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, shared, frozen_mask["encoder"])
            grads, coef, loss, wstate = method.combine(wstate, losses, task_grads, shared, wkey)
            return (loss, jax.tree.map(lambda x: x.sum(0), per_task), coef, wstate), grads
        if method.every_task:
            batch = task_stacked_flat(batch)
        if k == 1:
            terms, pullback, per_task = jax.vjp(lambda p: loss_fn(p, batch, key), params, has_aux=True)
            _, present = mean_losses(per_task, tasks)
            w, loss, wstate = method.loss_weights(wstate, terms, present, static, wkey)
            (grads,) = pullback(jax.lax.stop_gradient(w))
            return (loss, per_task, w, wstate), grads
        counts = label_counts(batch["labels"])
        present = (counts > 0).astype(jnp.float32)
        micro_terms = lambda p, mb, key: loss_fn(p, mb, key, counts, share)  # noqa: E731
        # the weights before the backward passes: from this batch's losses (famo: a forward pass), else
        # from the state alone (their losses argument only updates the state, done after the passes)
        known = (
            accumulated(lambda mb, key: micro_terms(params, mb, key)[0], batch, key, k)
            if method.method == "famo"
            else None
        )
        w, loss, new_state = method.loss_weights(
            wstate, jnp.zeros(len(tasks)) if known is None else known, present, static, wkey
        )

        def grads_of(mb, key):
            terms, pullback, per_task = jax.vjp(lambda p: micro_terms(p, mb, key), params, has_aux=True)
            return pullback(jax.lax.stop_gradient(w))[0], terms, per_task

        grads, terms, per_task = accumulated(grads_of, batch, key, k)
        if known is None:
            _, loss, new_state = method.loss_weights(wstate, terms, present, static, wkey)
        return (loss, per_task, w, new_state), grads

    def train_step(state: TrainState, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        (loss, per_task, task_w, wstate), grads = loss_and_grads(state.params, state.weighting, batch, key)
        # Finite check over what trains only (reading frozen grads would keep their backward pass alive).
        mask = frozen_mask if frozen_mask is not None else jax.tree.map(lambda _: False, grads)
        trained = [g for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if not f]
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(trained))

        def update(operands):
            grads, params, opt_state, _, wstate = operands
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if frozen_mask is not None:
                new_params = jax.tree.map(lambda f, old, new: old if f else new, frozen_mask, params, new_params)
            return new_params, new_opt_state, wstate

        # A non-finite loss or gradient skips the update: params, optimizer and weighting state stay as they were.
        # (A cond, not a select: selecting after the update costs a full extra pass over the state.)
        params, opt_state, wstate = jax.lax.cond(
            finite,
            update,
            lambda operands: operands[1:4],
            (grads, state.params, state.opt_state, state.weighting, wstate),
        )
        streak = jnp.where(finite, 0, state.nonfinite + 1)
        per_task = {
            t: per_task[t] | {"weight": task_w[i]} for i, t in enumerate(tasks)
        }  # (a pytree's keys come sorted)
        metrics = {
            "loss": jnp.where(finite, loss, 0.0),
            "steps": finite.astype(jnp.int32),
            "skipped": 1 - finite.astype(jnp.int32),
            "streak": streak,
            "tasks": jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), per_task),
        }
        return TrainState(state.step + 1, params, opt_state, streak, wstate), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: MultiTaskModel) -> Callable:
    """``eval_step(params, batch) -> {task: predicted class per slot [R * S]}`` plus per-task loss sums."""
    tasks = [name for name, _ in model.tasks]

    @jax.jit
    def eval_step(params, batch):
        logits = forward(model, params, batch)
        per_task = task_losses(logits, batch["labels"], tasks)
        preds = {t: jnp.argmax(logits[t], axis=-1) for t in tasks}
        return preds, {t: m["loss_sum"] for t, m in per_task.items()}

    return eval_step


def make_embed_step(model: MultiTaskModel) -> Callable:
    """``embed_step(params, batch) -> pooled [R * S, D]`` of a packed batch: the encoder alone, no dropout."""

    @jax.jit
    def embed_step(params, batch):
        pooled = model.apply(
            model_variables(params),
            batch["ids"],
            batch["positions"],
            batch["segments"],
            batch["labels"].shape[-2],
            method=MultiTaskModel.embed_packed,
        )
        return pooled.reshape(-1, pooled.shape[-1])

    return embed_step


def make_grad_probe(model: MultiTaskModel) -> Callable:
    """``probe(params, stacked) -> {"loss", "grad_norm" [T], "cosine" [T, T]}``: task-gradient diagnostics.

    Each task's gradient of its mean loss over its own sub-batch of the task-stacked
    ``stacked`` (no dropout), measured on the shared encoder.
    """
    loss_fn = summed(make_loss_fn(model))

    @jax.jit
    def probe(params, stacked):
        (losses, _), grads = per_task_grads(loss_fn, params, stacked, None)
        norms, cosine = cosine_matrix(grads["encoder"])
        return {"loss": losses, "grad_norm": norms, "cosine": cosine}

    return probe


def frozen_param_mask(params, frozen: frozenset[str]):
    """A tree of bools like ``params``: True where the parameter's group is frozen."""
    return jax.tree.map(lambda g: g in frozen, param_groups(params))


def build_train_step(
    model: MultiTaskModel,
    params,
    frozen: frozenset[str],
    optim: OptimConfig,
    weighting: str | Weighting = "sum",
    weights: dict[str, float] | None = None,
    grad_accum: int = 1,
):
    """``(tx, train_step)`` for one freezing phase: the trainer, the benchmarks and the tests build it here.

    A fully frozen encoder runs without dropout (a fixed feature extractor, so its
    embeddings can be cached). ``weights``: per-task loss weights for ``static`` (default 1).
    """
    groups = set(jax.tree.leaves(param_groups(params)))
    tx = make_optimizer(params, frozen, optim, model.config.n_layers)
    weights = {name: (weights or {}).get(name, 1.0) for name, _ in model.tasks}
    step = make_train_step(
        model, tx, weights, frozen_param_mask(params, frozen), weighting, encoder_frozen(frozen, groups), grad_accum
    )
    return tx, step


def zero_metrics(tasks: Sequence[str]) -> dict:
    """The running sums a train step's metrics add into (see :func:`accumulate`)."""
    z = lambda dtype: jnp.zeros((), dtype)  # noqa: E731
    return {
        "loss": z(jnp.float32),
        "steps": z(jnp.int32),
        "skipped": z(jnp.int32),
        "tasks": {
            t: {"loss_sum": z(jnp.float32), "correct": z(jnp.int32), "count": z(jnp.int32), "weight": z(jnp.float32)}
            for t in tasks
        },
    }


@jax.jit
def accumulate(total, metrics):
    """Adds a step's metrics into the running sums, on the device (no host sync)."""
    return jax.tree.map(jnp.add, total, {k: v for k, v in metrics.items() if k != "streak"})
