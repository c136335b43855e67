"""Optimizer, train state, the jit-compiled train and eval steps, and ``evaluate``.

The train state is a plain pytree; ``train_step`` is one ``jax.jit`` with the state
donated. The loss is the weighted sum over tasks of the mean cross-entropy over the
examples that carry that task's label (``-1``: no label). Metrics come back as
device arrays and are only fetched by the host when logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.data import Tokenized, eval_batches
from mtl_jax.freezing import labels_for, param_groups
from mtl_jax.metrics import classification_report
from mtl_jax.model import MultiTaskModel
from mtl_jax.parallel import shard_batch, to_host
from mtl_jax.weighting import METHODS, cosine_matrix, pcgrad, uncertainty_loss, weighted_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    nonfinite: jax.Array = None  # int32 scalar: consecutive non-finite steps so far

    @classmethod
    def create(cls, params, opt_state) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), params, opt_state, jnp.zeros((), jnp.int32))


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # peak LR of the encoder's top layer
    head_lr: float = 1e-3
    total_steps: int = 1000
    warmup_steps: int = 60
    decay: str = "linear"  # or "cosine"
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    layer_decay: float = 1.0  # encoder LR multiplier per layer below the top


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning-rate multiplier in [0, 1]: linear warm-up, then linear or cosine decay to 0."""
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    after = (
        optax.cosine_decay_schedule(1.0, decay_steps)
        if cfg.decay == "cosine"
        else optax.linear_schedule(1.0, 0.0, decay_steps)
    )
    warm = optax.linear_schedule(0.0, 1.0, max(cfg.warmup_steps, 1))
    return optax.join_schedules([warm, after], [cfg.warmup_steps])


def _decays(path, _) -> bool:
    """Weight decay on kernels and embeddings, not on biases, LayerNorm parameters or loss weights."""
    names = [getattr(p, "key", str(p)) for p in path]
    return names[0] != "loss_weights" and names[-1] not in ("bias", "scale")


def group_lr(group: str, cfg: OptimConfig, n_layers: int) -> float:
    if group.startswith("head:") or group == "loss_weights":
        return cfg.head_lr
    depth = n_layers - int(group.split("_")[1]) if group.startswith("layer_") else n_layers + 1
    return cfg.lr * cfg.layer_decay ** (depth - 1)


def make_optimizer(params, frozen: frozenset[str], cfg: OptimConfig, n_layers: int) -> optax.GradientTransformation:
    """AdamW per trainable group (own LR), frozen groups zeroed, global-norm clipping over what trains.

    Frozen gradients are zeroed *before* clipping, so nothing downstream reads them and
    XLA never computes them. Each group keeps its own Adam moments and count, so a phase
    change of gradual unfreezing leaves the other groups' state untouched.
    """
    labels = labels_for(params, frozen)
    trainable = {g for g in jax.tree.leaves(param_groups(params)) if g not in frozen}
    routes = {g: optax.identity() for g in trainable} | {"frozen": optax.set_to_zero()}
    groups = {
        g: optax.chain(
            optax.scale_by_adam(),
            optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p)),
            optax.scale(-group_lr(g, cfg, n_layers)),
        )
        for g in trainable
    } | {"frozen": optax.set_to_zero()}
    return optax.chain(
        optax.multi_transform(routes, labels),
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.multi_transform(groups, labels),
        optax.scale_by_schedule(schedule(cfg)),
    )


def carry_opt_state(old_state, new_state, old_frozen: frozenset[str], new_frozen: frozenset[str]):
    """Moves each group's Adam state, and the schedule's count, into a rebuilt optimizer's state."""
    old_inner = old_state[2].inner_states
    inner = dict(new_state[2].inner_states)
    for g in inner:
        if g != "frozen" and g in old_inner and g not in old_frozen and g not in new_frozen:
            inner[g] = old_inner[g]
    return (new_state[0], new_state[1], new_state[2]._replace(inner_states=inner), old_state[3])


def count_numbers(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def task_losses(logits: dict[str, jax.Array], labels: jax.Array, tasks: Sequence[str]) -> dict[str, jax.Array]:
    """Per task: summed cross-entropy, correct count and example count over labelled rows."""
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
    """Logits of a batch of token ids, or of cached pooled embeddings (``batch["embeddings"]``).

    With a ``key`` dropout is on (training), except inside a frozen encoder, which runs
    as a fixed feature extractor: that is what makes its embeddings cacheable.
    """
    train = key is not None
    rngs = {"dropout": key} if train else {}
    if "embeddings" in batch:
        return model.apply(model_variables(params), batch["embeddings"], deterministic=not train, rngs=rngs,
                           method=MultiTaskModel.classify)
    logits, _ = model.apply(model_variables(params), batch["input_ids"], batch["attention_mask"],
                            deterministic=not train, encoder_deterministic=encoder_frozen or not train, rngs=rngs)
    return logits


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


def make_loss_fn(model: MultiTaskModel, weights: dict[str, float], weighting: str = "static",
                 encoder_frozen: bool = False) -> Callable:
    """``loss_fn(params, batch, key) -> (loss, per-task sums)``; ``key=None``: no dropout.

    For ``pcgrad`` this is each task's plain loss (the projection happens on the gradients).
    """
    if weighting not in METHODS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose from {', '.join(METHODS)}")
    tasks = [name for name, _ in model.tasks]
    if weighting in ("sum", "pcgrad"):
        weights = {t: 1.0 for t in tasks}

    def loss_fn(params, batch, key):
        per_task = task_losses(forward(model, params, batch, key, encoder_frozen), batch["labels"], tasks)
        if weighting == "uncertainty":
            return uncertainty_loss(per_task, params["loss_weights"]), per_task
        return weighted_loss(per_task, weights), per_task

    return loss_fn


def make_train_step(model: MultiTaskModel, tx: optax.GradientTransformation, weights: dict[str, float],
                    frozen_mask=None, weighting: str = "static", encoder_frozen: bool = False) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, jitted with the state donated.

    ``weighting`` (see :mod:`mtl_jax.weighting`): ``static`` uses ``weights``, ``sum``
    weight 1, ``uncertainty`` the learned ``params["loss_weights"]``, ``pcgrad`` needs a
    task-stacked batch (arrays ``[rows, T, ...]``). A batch may hold token ids or cached
    embeddings (``"embeddings"``); each kind compiles its own shapes.
    ``frozen_mask`` (a tree of bools like the params) keeps frozen parameters as they
    were, bit for bit (``p + 0`` would turn -0.0 into +0.0).
    """
    loss_fn = make_loss_fn(model, weights, weighting, encoder_frozen)

    def loss_and_grads(params, batch, key):
        if weighting != "pcgrad":
            return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        (losses, per_task), task_grads = per_task_grads(loss_fn, params, batch, key)
        grads = jax.tree.map(lambda g: g.sum(0), task_grads)
        if not encoder_frozen:  # projections over the encoder's trainable part (frozen grads are never computed)
            shared = task_grads["encoder"]
            if frozen_mask is not None:
                shared = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, shared, frozen_mask["encoder"])
            grads["encoder"] = pcgrad(shared, jax.random.fold_in(key, 1 << 20))
        return (losses.sum(), jax.tree.map(lambda x: x.sum(0), per_task)), grads

    def train_step(state: TrainState, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        (loss, per_task), grads = loss_and_grads(state.params, batch, key)
        # Finite check over what trains only (reading frozen grads would keep their backward pass alive).
        mask = frozen_mask if frozen_mask is not None else jax.tree.map(lambda _: False, grads)
        trained = [g for g, f in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if not f]
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(trained))

        def update(operands):
            grads, params, opt_state = operands
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            if frozen_mask is not None:
                new_params = jax.tree.map(lambda f, old, new: old if f else new, frozen_mask, params, new_params)
            return new_params, new_opt_state

        # A non-finite loss or gradient skips the update: params and optimizer state stay as they were.
        # (A cond, not a select: selecting after the update costs a full extra pass over the state.)
        params, opt_state = jax.lax.cond(
            finite, update, lambda operands: operands[1:], (grads, state.params, state.opt_state)
        )
        streak = jnp.where(finite, 0, state.nonfinite + 1)
        metrics = {
            "loss": jnp.where(finite, loss, 0.0),
            "steps": finite.astype(jnp.int32),
            "skipped": 1 - finite.astype(jnp.int32),
            "streak": streak,
            "tasks": jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), per_task),
        }
        return TrainState(state.step + 1, params, opt_state, streak), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: MultiTaskModel) -> Callable:
    """``eval_step(params, batch) -> {task: predicted class [B]}`` plus per-task loss sums."""
    tasks = [name for name, _ in model.tasks]

    @jax.jit
    def eval_step(params, batch):
        logits = forward(model, params, batch)
        per_task = task_losses(logits, batch["labels"], tasks)
        preds = {t: jnp.argmax(logits[t], axis=-1) for t in tasks}
        return preds, {t: m["loss_sum"] for t, m in per_task.items()}

    return eval_step


def make_embed_step(model: MultiTaskModel) -> Callable:
    """``embed_step(params, batch) -> pooled [B, D]``: the encoder alone, no dropout."""

    @jax.jit
    def embed_step(params, batch):
        return model.apply(model_variables(params), batch["input_ids"], batch["attention_mask"],
                           method=MultiTaskModel.embed)

    return embed_step


def make_grad_probe(model: MultiTaskModel) -> Callable:
    """``probe(params, stacked) -> {"loss", "grad_norm" [T], "cosine" [T, T]}``: task-gradient diagnostics.

    Each task's gradient of its mean loss over its own sub-batch of the task-stacked
    ``stacked`` (no dropout), measured on the shared encoder.
    """
    loss_fn = make_loss_fn(model, {}, "sum")

    @jax.jit
    def probe(params, stacked):
        (losses, _), grads = per_task_grads(loss_fn, params, stacked, None)
        norms, cosine = cosine_matrix(grads["encoder"])
        return {"loss": losses, "grad_norm": norms, "cosine": cosine}

    return probe


def over_examples(fn: Callable, params, data: Tokenized, batch_size: int, max_length: int, pad_id: int,
                  mesh=None, bar=None) -> list:
    """``[(example indices, fn(params, batch))]`` over every example of ``data`` once, length-sorted.

    Results stay on the device until read; with a ``mesh`` each batch is split over its devices.
    """
    out = []
    for batch in eval_batches(data, batch_size, max_length, pad_id):
        arrays = batch.arrays() if mesh is None else shard_batch(batch.arrays(), mesh)
        out.append((batch.index, fn(params, arrays)))
        if bar is not None:
            bar.update(len(batch.index))
    return out


def embed_examples(embed_step: Callable, params, data: Tokenized, batch_size: int, max_length: int, pad_id: int,
                   mesh=None, bar=None) -> np.ndarray:
    """Pooled embeddings ``[N, D]`` float32 of every example of ``data``, in its order."""
    out = None
    for index, pooled in over_examples(embed_step, params, data, batch_size, max_length, pad_id, mesh, bar):
        pooled = to_host(pooled)
        if out is None:
            out = np.zeros((len(data), pooled.shape[1]), np.float32)
        out[index] = pooled[: len(index)]
    return out if out is not None else np.zeros((0, 0), np.float32)


def evaluate(eval_step: Callable, params, data: Tokenized, label_names: dict[str, tuple[str, ...]],
             batch_size: int, max_length: int, pad_id: int, mesh=None) -> dict:
    """Metrics per task over every labelled example of ``data`` exactly once (padding never counts).

    ``data`` may carry cached embeddings (then only the heads run). With a ``mesh``
    each batch is split over its devices.
    """
    tasks = list(label_names)
    preds = np.full((len(data), len(tasks)), -1, np.int64)
    loss_sums = {t: 0.0 for t in tasks}
    for index, result in over_examples(eval_step, params, data, batch_size, max_length, pad_id, mesh):
        p, losses = to_host(result)
        for ti, t in enumerate(tasks):
            preds[index, ti] = np.asarray(p[t])[: len(index)]
            loss_sums[t] += float(losses[t])
    out = {}
    for ti, t in enumerate(tasks):
        has = data.labels[:, ti] >= 0
        report = classification_report(data.labels[has, ti], preds[has, ti], label_names[t])
        report["loss"] = loss_sums[t] / max(int(has.sum()), 1)
        out[t] = report
    return out


def frozen_param_mask(params, frozen: frozenset[str]):
    return jax.tree.map(lambda g: g in frozen, param_groups(params))


@jax.jit
def _add_metrics(total, metrics):
    out = jax.tree.map(jnp.add, total, metrics)
    out["streak"] = jnp.maximum(total["streak"], metrics["streak"])  # longest streak in the interval
    return out


def accumulate(total, metrics):
    """Adds step metrics on the device (no host sync)."""
    return metrics if total is None else _add_metrics(total, metrics)
