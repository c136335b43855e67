"""Freezing scenarios as parameter labels for ``optax.multi_transform``.

Every parameter belongs to exactly one group (``embeddings``, ``layer_<i>``,
``head:<task>``, and ``loss_weights`` for learned loss weights); a scenario names the
frozen groups. Frozen groups get
``optax.set_to_zero()``, so they hold no optimizer state and XLA drops the backward
pass that only they need. Gradual unfreezing is a list of phases, each starting at
an epoch or a step; a phase change rebuilds the optimizer once.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import jax
import numpy as np
from flax import traverse_util

from mtl_jax.errors import MtlError

# (pattern over the "/"-joined parameter path, group name template)
GROUP_RULES = (
    (re.compile(r"^encoder/(embeddings|type_offsets)/"), "embeddings"),  # (type_offsets: BERT's token types)
    (re.compile(r"^encoder/transformer/layer/(\d+)/(?!.*/lora_[ab]$)"), "layer_{0}"),
    (re.compile(r"^encoder/.*/lora_[ab]$"), "lora"),  # --freeze lora: the adapters (mtl_jax.model.lora)
    (re.compile(r"^heads/([^/]+)/"), "head:{0}"),
    (re.compile(r"^loss_weights/"), "loss_weights"),  # --loss-weighting uncertainty: trains with the heads
    (re.compile(r"^guide/"), "guide"),  # guide: initial's starting encoder: frozen in every scenario
)


def group_of(path: str) -> str:
    """The group of one parameter; exactly one rule must match."""
    hits = [(rule, m) for rule, tmpl in GROUP_RULES if (m := rule.match(path))]
    if len(hits) != 1:
        raise ValueError(f"parameter {path} matched {len(hits)} freezing rules, expected exactly 1")
    rule, m = hits[0]
    return dict(GROUP_RULES)[rule].format(*m.groups())


def layer_index(group: str) -> int | None:
    """``layer_<i>`` -> i; None for any other group."""
    return int(group.split("_")[1]) if group.startswith("layer_") else None


def param_groups(params) -> dict:
    """A tree like ``params`` whose leaves are group names."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict({k: group_of(k) for k in flat}, sep="/")


def group_sizes(params) -> dict[str, int]:
    """Number of parameters per group (logged by the trainer)."""
    sizes: Counter = Counter()
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        sizes[group_of(path)] += int(np.prod(leaf.shape))
    return dict(sizes)


def frozen_groups(spec: str, groups: set[str]) -> frozenset[str]:
    """The frozen groups of one scenario: none | backbone | all | head:<task> | top:<k> | lora (and
    ``guide``, the starting encoder of ``guide: initial``, in each)."""
    return _scenario_groups(spec.strip(), groups) | (groups & {"guide"})


def _scenario_groups(spec: str, groups: set[str]) -> frozenset[str]:
    heads = {g for g in groups if g.startswith("head:")}
    backbone = {g for g in groups if g in ("embeddings", "lora") or g.startswith("layer_")}
    layers = sorted(i for g in groups if (i := layer_index(g)) is not None)
    if spec == "none":
        return frozenset()
    if spec == "backbone":
        return frozenset(backbone)
    if spec == "lora":  # the encoder frozen but its adapters
        return frozenset(backbone - {"lora"})
    if spec == "all":
        return frozenset(groups)
    if spec.startswith("head:"):
        if spec not in heads:
            names = ", ".join(sorted(h[5:] for h in heads))
            raise MtlError(f"--freeze {spec}: no task {spec[5:]!r} (tasks: {names})")
        return frozenset({spec})
    if spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            raise MtlError(f"--freeze {spec}: top:<k> needs an integer k") from None
        if not 0 <= k <= len(layers):
            raise MtlError(f"--freeze {spec}: k must be between 0 and {len(layers)} (the encoder's layers)")
        keep = set(layers[len(layers) - k :])
        return frozenset(g for g in backbone if layer_index(g) not in keep)
    raise MtlError(f"--freeze {spec!r}: expected none, backbone, all, head:<task>, top:<k>, lora or phases")


@dataclass(frozen=True)
class Phase:
    spec: str
    unit: str = "step"  # "epoch" or "step"
    start: int = 0


def parse_phases(text: str) -> list[Phase]:
    """``"backbone,top:2@epoch:1,none@step:900"`` -> phases; the first starts at 0."""
    phases = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        if not part:
            raise MtlError(f"--freeze {text!r}: empty phase")
        spec, _, when = part.partition("@")
        if i == 0:
            if when:
                raise MtlError(f"--freeze {text!r}: the first phase starts at 0 and takes no @")
            phases.append(Phase(spec.strip()))
            continue
        m = re.fullmatch(r"(epoch|step):(\d+)", when.strip())
        if not m:
            raise MtlError(f"--freeze {text!r}: phase {part!r} needs @epoch:N or @step:N")
        phases.append(Phase(spec.strip(), m.group(1), int(m.group(2))))
    return phases


def phase_starts(phases: list[Phase], steps_per_epoch: int) -> list[int]:
    """The step at which each phase starts (an epoch has ``steps_per_epoch`` steps)."""
    return [p.start * (steps_per_epoch if p.unit == "epoch" else 1) for p in phases]


def phase_at(starts: list[int], step: int) -> int:
    """Index of the phase in force at ``step`` (``starts`` from :func:`phase_starts`; later phases win)."""
    return max(i for i, s in enumerate(starts) if step >= s or i == 0)


def phase_end(starts: list[int], step: int, total_steps: int) -> int:
    """The step at which the phase in force at ``step`` ends: the next phase's start, or the run's end."""
    return min([s for s in starts[1:] if s > step] + [total_steps])


def encoder_frozen(frozen: frozenset[str], groups: set[str]) -> bool:
    """Whether every encoder group is frozen (the encoder then runs without dropout and can be cached)."""
    return frozen_groups("backbone", groups) <= frozen


def labels_for(params, frozen: frozenset[str]) -> dict:
    """multi_transform labels: ``"frozen"`` or the parameter's group."""
    return jax.tree.map(lambda g: "frozen" if g in frozen else g, param_groups(params))
