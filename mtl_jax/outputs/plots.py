"""Pictures of a run: training curves and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(records: list[dict], tasks: Sequence[str], path: Path) -> None:
    """Per-task training loss over steps (left) and each task's validation metrics per evaluation (right)."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    for i, t in enumerate(tasks):
        color = f"C{i}"  # one colour per task in both panels
        pts = [(r["step"], r[t]["loss"]) for r in train if r.get(t, {}).get("loss") is not None]
        if pts:
            ax_loss.plot(*zip(*pts), color=color, label=t)
        keys = [k for k in (val[-1].get(t, {}) if val else {}) if k not in ("loss", "examples")]
        for key, style in zip(keys, ("-o", "--s", ":^", "-.v")):  # the task's metrics in its records
            pts = [(r["step"], r[t][key]) for r in val if t in r]
            if pts:
                ax_val.plot(*zip(*pts), style, color=color, label=f"{t} {key}")
    ax_loss.set(xlabel="step", ylabel="training loss (mean over log interval)", title="Training loss")
    ax_val.set(xlabel="step", ylabel="score", title="Validation", ylim=(0, 1))
    _finish(fig, (ax_loss, ax_val), path)


def plot_confusion(confusion: list[list[int]], labels: Sequence[str], title: str, path: Path) -> None:
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.1 * len(labels) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black"
            )
    _finish(fig, (), path)


def plot_gradients(records: list[dict], tasks: Sequence[str], path: Path) -> None:
    """Task-gradient diagnostics: each task's gradient norm on the encoder (left), cosines between tasks (right)."""
    grads = [r for r in records if r["split"] == "gradients"]
    fig, (ax_norm, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in grads]
    for i, t in enumerate(tasks):
        ax_norm.plot(steps, [r[t]["grad_norm"] for r in grads], color=f"C{i}", label=t)
    for i, pair in enumerate(grads[0]["cosine"] if grads else {}):
        ax_cos.plot(steps, [r["cosine"][pair] for r in grads], color=f"C{i}", label=pair.replace("|", " vs "))
    ax_cos.axhline(0.0, color="grey", lw=0.8)
    ax_norm.set(xlabel="step", ylabel="gradient norm on the encoder", title="Per-task gradient norm", yscale="log")
    ax_cos.set(xlabel="step", ylabel="cosine", title="Cosine between task gradients (< 0: conflict)", ylim=(-1, 1))
    _finish(fig, (ax_norm, ax_cos), path)


def plot_compare(summary: list[dict], primary: dict[str, str], path: Path) -> None:
    """Per task: its mean primary test score (``primary[task]``, a column such as ``test_macro_f1``;
    +/- std over seeds) against mean wall time, one point per scenario."""
    fig, axes = plt.subplots(1, len(primary), figsize=(5.5 * len(primary), 4.2), squeeze=False)
    for ax, (t, column) in zip(axes[0], primary.items()):
        for i, s in enumerate(summary):
            mean, std = s[f"{t}_{column}"]
            label = s["scenario"] if s["weighting"] == "sum" else f"{s['scenario']} ({s['weighting']})"
            ax.errorbar(s["wall_s"], mean, yerr=std, fmt="o", color=f"C{i % 10}", capsize=3, label=label)
        ax.set(xlabel="wall time per run (s)", ylabel=column.replace("_", " ", 1), title=t)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")  # one legend for all panels
    _finish(fig, (), path)


def plot_sizes(scores: dict[int, float], whole: float, title: str, path: Path) -> None:
    """A score per embedding size (Matryoshka prefixes), the whole embedding's as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sizes = sorted(scores)
    ax.plot(sizes, [scores[d] for d in sizes], "-o", label="first dimensions")
    ax.axhline(whole, linestyle="--", color="gray", label="whole embedding")
    ax.set(xscale="log", xlabel="dimensions", ylabel="score", title=title)
    ax.set_xticks(sizes, [str(d) for d in sizes])
    _finish(fig, (ax,), path)


def _finish(fig, panels, path: Path) -> None:
    """Grid and legend on each of ``panels``, then save ``fig`` to ``path`` and free it."""
    for ax in panels:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
