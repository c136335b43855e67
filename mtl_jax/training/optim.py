"""The optimizer: AdamW per parameter group with its own learning rate, frozen groups zeroed,
global-norm clipping over what trains, and one warm-up + decay schedule.

The state is an ``optax.named_chain``: its parts are read by name (``route``, ``clip``,
``groups``, ``schedule``), never by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import optax

from mtl_jax.training.freezing import labels_for, layer_index, param_groups


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer's settings; built from a run's config by :meth:`from_config` (no defaults of its own)."""

    lr: float  # peak LR of the encoder's top layer
    head_lr: float  # peak LR of the heads (and learned loss weights)
    lora_lr: float  # peak LR of the LoRA adapters
    total_steps: int
    warmup_steps: int
    decay: str  # "linear" or "cosine"
    weight_decay: float
    clip_norm: float
    layer_decay: float  # encoder LR multiplier per layer below the top

    @classmethod
    def from_config(cls, cfg, total_steps: int) -> OptimConfig:
        """From a :class:`mtl_jax.config.TrainConfig` and the run's length."""
        return cls(
            lr=cfg.lr,
            head_lr=cfg.head_lr if cfg.head_lr is not None else 10 * cfg.lr,
            lora_lr=cfg.lora_lr if cfg.lora_lr is not None else 10 * cfg.lr,
            total_steps=total_steps,
            warmup_steps=int(round(cfg.warmup * total_steps)),
            decay=cfg.decay,
            weight_decay=cfg.weight_decay,
            clip_norm=cfg.clip_norm,
            layer_decay=cfg.layer_decay,
        )


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
    """Peak LR of one group: ``head_lr`` for heads and loss weights; ``lr * layer_decay**d`` for the
    encoder, ``d`` counting layers below the top (the embeddings sit below layer 0)."""
    if group.startswith("head:") or group == "loss_weights":
        return cfg.head_lr
    if group == "lora":
        return cfg.lora_lr
    layer = layer_index(group)
    depth = n_layers - layer if layer is not None else n_layers + 1
    return cfg.lr * cfg.layer_decay ** (depth - 1)


def make_optimizer(params, frozen: frozenset[str], cfg: OptimConfig, n_layers: int) -> optax.GradientTransformation:
    """AdamW per trainable group (own LR), frozen groups zeroed, global-norm clipping over what trains.

    Frozen gradients are zeroed *before* clipping, so nothing downstream reads them and
    XLA never computes them. Each group keeps its own Adam moments and count, so a phase
    change of gradual unfreezing leaves the other groups' state untouched.
    """
    labels = labels_for(params, frozen)
    # sorted: the traced update (and so the program and its compile-cache key) must not follow
    # the set's order, which changes with every process's string-hash seed
    trainable = sorted({g for g in jax.tree.leaves(param_groups(params)) if g not in frozen})
    routes = {g: optax.identity() for g in trainable} | {"frozen": optax.set_to_zero()}
    groups = {
        g: optax.chain(
            optax.scale_by_adam(),
            optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p)),
            optax.scale(-group_lr(g, cfg, n_layers)),
        )
        for g in trainable
    } | {"frozen": optax.set_to_zero()}
    return optax.named_chain(
        ("route", optax.multi_transform(routes, labels)),
        ("clip", optax.clip_by_global_norm(cfg.clip_norm)),
        ("groups", optax.multi_transform(groups, labels)),
        ("schedule", optax.scale_by_schedule(schedule(cfg))),
    )


def carry_opt_state(old_state, new_state, old_frozen: frozenset[str], new_frozen: frozenset[str]):
    """Moves each group's Adam state, and the schedule's count, into a rebuilt optimizer's state.

    A group that trained before and trains after keeps its moments; a newly unfrozen group
    starts fresh; the schedule goes on from where it was.
    """
    old_inner = old_state["groups"].inner_states
    inner = dict(new_state["groups"].inner_states)
    for g in inner:
        if g != "frozen" and g in old_inner and g not in old_frozen and g not in new_frozen:
            inner[g] = old_inner[g]
    out = new_state.copy()  # (an OrderedDict: the same pytree type as the optimizer's state)
    out["groups"] = new_state["groups"]._replace(inner_states=inner)
    out["schedule"] = old_state["schedule"]
    return out


def count_numbers(tree) -> int:
    """Numbers held by a pytree's arrays (the optimizer state's size in the logs)."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
