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
from mtl_jax.parallel import shard_batch


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
    """Weight decay on kernels and embeddings, not on biases or LayerNorm parameters."""
    names = [getattr(p, "key", str(p)) for p in path]
    return names[-1] not in ("bias", "scale")


def group_lr(group: str, cfg: OptimConfig, n_layers: int) -> float:
    if group.startswith("head:"):
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


def weighted_loss(per_task: dict, weights: dict[str, float]) -> jax.Array:
    """Sum over tasks of weight x mean loss; a task with no labels in the batch adds 0."""
    return sum(weights[t] * m["loss_sum"] / jnp.maximum(m["count"], 1) for t, m in per_task.items())


def make_train_step(model: MultiTaskModel, tx: optax.GradientTransformation, weights: dict[str, float],
                    frozen_mask=None) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``, jitted with the state donated.

    ``frozen_mask`` (a tree of bools like the params) keeps frozen parameters as they
    were, bit for bit (``p + 0`` would turn -0.0 into +0.0).
    """
    tasks = [name for name, _ in model.tasks]

    def loss_fn(params, batch, key):
        logits, _ = model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=False, rngs={"dropout": key}
        )
        per_task = task_losses(logits, batch["labels"], tasks)
        return weighted_loss(per_task, weights), per_task

    def train_step(state: TrainState, batch, rng):
        key = jax.random.fold_in(rng, state.step)
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)

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
        logits, _ = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        per_task = task_losses(logits, batch["labels"], tasks)
        preds = {t: jnp.argmax(logits[t], axis=-1) for t in tasks}
        return preds, {t: m["loss_sum"] for t, m in per_task.items()}

    return eval_step


def evaluate(eval_step: Callable, params, data: Tokenized, label_names: dict[str, tuple[str, ...]],
             batch_size: int, max_length: int, pad_id: int, mesh=None) -> dict:
    """Metrics per task over every labelled example of ``data`` exactly once (padding never counts).

    With a ``mesh`` each batch is split over its devices.
    """
    tasks = list(label_names)
    preds = np.full((len(data), len(tasks)), -1, np.int64)
    loss_sums = {t: 0.0 for t in tasks}
    pending = []
    for batch in eval_batches(data, batch_size, max_length, pad_id):
        arrays = batch.arrays() if mesh is None else shard_batch(batch.arrays(), mesh)
        pending.append((batch.index, eval_step(params, arrays)))
    for index, (p, losses) in pending:
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
