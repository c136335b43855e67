"""What a run writes for people: metrics.jsonl records, summary.json, plots, report.md, export."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from mtl_jax.config import TrainConfig
from mtl_jax.errors import writing
from mtl_jax.model.lora import lora_of, merge_adapters
from mtl_jax.outputs.export import export_model
from mtl_jax.outputs.plots import plot_curves, plot_gradients


def train_record(totals, step: int, epoch: int, tasks) -> dict:
    """Mean loss and per-task loss (and accuracy, for the types that have one: ``Task.train_accuracy``)
    over the steps since the last record, from a :class:`~mtl_jax.training.steps.StepTotals` (fetched from
    the device)."""
    m = jax.device_get(totals)
    steps = max(int(m.steps), 1)
    rec = {"step": step, "epoch": epoch, "split": "train", "loss": float(m.loss) / steps, "skipped": int(m.skipped)}
    for t in tasks:
        sums = m.tasks[t.name]
        c = int(sums.count)
        rec[t.name] = {"loss": float(sums.loss_sum) / c if c else None}
        if t.train_accuracy:
            rec[t.name]["accuracy"] = float(sums.correct) / c if c else None
        rec[t.name] |= {"examples": c, "weight": float(sums.weight) / steps}  # mean loss weight (see weighting)
    return rec


def scalar_series(rec: dict, prefix: str | None = None):
    """``(tag, value)`` for every number in a metrics record (``train/task_a/loss``, ...): what TensorBoard plots."""
    prefix = rec["split"] if prefix is None else prefix
    for key, value in rec.items():
        if key in ("step", "epoch", "split") or isinstance(value, bool):
            continue
        if isinstance(value, dict):
            yield from scalar_series(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)):
            yield f"{prefix}/{key}", value


def eval_record(results: dict, step: int, epoch: int, split: str, tasks) -> dict:
    """An evaluation's metrics.jsonl record: each task's ``record_keys``, and the mean of the tasks'
    primary scores (``mean_<metric>`` when every task has the same primary metric, else ``mean_primary``)."""
    rec = {"step": step, "epoch": epoch, "split": split, "loss": sum(r["loss"] for r in results.values())}
    for t in tasks:
        rec[t.name] = {k: results[t.name][k] for k in t.record_keys} | {"primary": t.primary}
    primaries = {t.primary for t in tasks}
    key = f"mean_{primaries.pop()}" if len(primaries) == 1 else "mean_primary"
    rec[key] = mean_score(results, tasks)
    return rec


def mean_score(results: dict, tasks) -> float:
    """The mean of the tasks' primary scores: what picks the best model and stops early."""
    return float(np.mean([t.score(results[t.name]) for t in tasks]))


def gradient_record(probe_out, step: int, epoch: int, tasks) -> dict:
    """Task-gradient diagnostics on the probe batch: per-task loss and encoder gradient norm, pairwise cosines."""
    m = jax.device_get(probe_out)
    rec = {"step": step, "epoch": epoch, "split": "gradients", "loss": float(np.sum(m.loss))}
    for i, t in enumerate(tasks):
        rec[t] = {"loss": float(m.loss[i]), "grad_norm": float(m.grad_norm[i])}
    rec["cosine"] = {
        f"{a}|{b}": float(m.cosine[i, j]) for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j
    }
    return rec


def write_outputs(run, summary: dict, best_params, records: list[dict]) -> None:
    """The export (best parameters) and the plots of a finished run."""
    out, names = run.out, run.names
    with writing(out):
        _write_outputs(run, summary, best_params, records, out, names)


def _write_outputs(run, summary: dict, best_params, records: list[dict], out, names) -> None:
    if run.cfg.export:
        spec = dataclasses.replace(run.encoder.spec, max_length=run.pipeline.max_length)
        export_model(
            out / "export",
            spec,
            merge_adapters(best_params["encoder"], lora_of(run.model.config)),
            best_params.get("heads", {}),
            run.encoder.hf_tokenizer,
            run.data.tasks,
            run.model.pooling,
        )
    plot_curves(records, names, out / "curves.png")
    if any(r["split"] == "gradients" for r in records):
        plot_gradients(records, names, out / "gradients.png")
    for task in run.data.tasks:
        task.plots(summary["test"][task.name], out)


def write_summary(run, summary: dict) -> None:
    """summary.json and report.md."""
    with writing(run.out / "summary.json"):
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    with writing(run.out / "report.md"):
        (run.out / "report.md").write_text(report_text(run.cfg, summary, run.data.tasks))


def report_text(cfg: TrainConfig, summary: dict, tasks) -> str:
    lines = [
        f"# Run report: {cfg.out}",
        "",
        f"Encoder `{cfg.encoder}`, freeze `{cfg.freeze}`, {summary['steps']} steps, batch {cfg.batch_size}, "
        f"lr {cfg.lr}, seed {cfg.seed}, dtype {cfg.dtype}, loss weighting {cfg.loss_weighting}, backend {summary['backend']}.",
        f"Best epoch {summary['best_epoch']} (mean validation {', '.join(sorted({t.primary for t in tasks}))}); wall time {summary['wall_s']:.0f} s, "
        f"{summary['examples_per_s']:.1f} training examples/s.",
        "Wall time by part (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items() if k != "wall")
        + f"; {summary['compiled_programs']} programs, {summary['programs_from_cache']} of them loaded from the "
        "compile cache.",
        "Compiled batch shapes: "
        + "; ".join(
            f"{k}: {', '.join('x'.join(map(str, s)) for s in v)}" for k, v in summary["compiled_shapes"].items()
        )
        + ".",
    ]
    if "loss_weights" in summary:
        lines.append(
            "Learned loss weights exp(-s): "
            + ", ".join(f"{t} {w:.3f}" for t, w in summary["loss_weights"].items())
            + "."
        )
    for task in tasks:
        lines += ["", f"## {task.name} ({task.type}, primary metric {task.primary})", "", *task.report_lines(summary)]
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)
