"""Freezing scenarios (and loss-weighting methods) measured against each other.

``compare(cfg)`` trains one run per (scenario, seed) in this process, seed by seed so
that a time budget cut still leaves every scenario measured on the first seeds, and
writes ``results.csv`` (one row per run), ``results.md`` (mean +/- std per scenario
and task) and ``results.png`` (test accuracy against wall time).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from mtl_jax.config import TrainConfig
from mtl_jax.errors import Interrupted
from mtl_jax.inference import load_encoder
from mtl_jax.training.freezing import frozen_groups, parse_phases
from mtl_jax.training.run import check_out_dir, log
from mtl_jax.training.trainer import train_and_evaluate
from mtl_jax.training.weighting import REGISTRY as WEIGHTING_METHODS

GRADUAL = "backbone,top:2@step:60,none@step:120"


@dataclass(frozen=True)
class CompareConfig(TrainConfig):
    """Options of every run (as in scripts/train.py), plus which scenarios, seeds and budget.

    Each run's --freeze, --seed and --loss-weighting come from --scenarios, --seeds and --weighting.
    """

    scenarios: tuple[str, ...] = ("none", "backbone", "head:*", "top:2", "gradual", "lora")
    """Freezing specs to compare; head:* is one scenario per task, gradual is --gradual."""
    gradual: str = GRADUAL
    """The gradual-unfreezing schedule of the 'gradual' scenario."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds per scenario (each seeds the heads, dropout and batch order; the split is --split-seed's)."""
    split_seed: Optional[int] = 0
    """Seed of the train/validation/test split: the same for every run, so all are tested on the same examples."""
    weighting: bool = False
    """Also compare every loss-weighting method (static only when the task weights differ)."""
    weighting_freeze: str = "none"
    """The freezing scenario the loss-weighting runs use."""
    budget_minutes: float = 60.0
    """Stop starting runs that would end past this budget (estimated from the runs so far); skipped runs are listed."""
    epochs: int = 1
    max_steps: Optional[int] = 240
    """Steps per run (240 x 32 examples: about 0.7 of an epoch of the embedded default, so that 7 scenarios x 3 seeds fit in an hour on 2 CPU cores)."""
    out: str = "runs/compare"
    """Folder for results.csv, results.md, results.png and each run's directory (runs/<scenario>-<weighting>-s<seed>)."""
    export: bool = False
    progress: bool = False


def plan_runs(cfg: CompareConfig, task_names: list[str]) -> list[dict]:
    """Runs in order: seed by seed, every scenario, then the loss-weighting methods."""
    scenarios = []
    for s in cfg.scenarios:
        if s == "head:*":
            scenarios += [f"head:{t}" for t in task_names]
        else:
            scenarios.append(s)
    methods = []
    if cfg.weighting:
        methods = [m for m in WEIGHTING_METHODS if m != "static" or len({t.weight for t in cfg.selected_tasks()}) > 1]
    runs = []
    for seed in cfg.seeds:
        for s in scenarios:
            runs.append(
                {"scenario": s, "freeze": cfg.gradual if s == "gradual" else s, "weighting": "sum", "seed": seed}
            )
        for m in methods:
            if m == "sum" and cfg.weighting_freeze in scenarios:
                continue  # that run is already in the scenario grid
            runs.append(
                {"scenario": cfg.weighting_freeze, "freeze": cfg.weighting_freeze, "weighting": m, "seed": seed}
            )
    return runs


def _run_name(run: dict) -> str:
    name = f"{run['scenario']}-{run['weighting']}-s{run['seed']}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _trainable(summary: dict, freeze: str) -> int:
    """Parameters that train in the last phase."""
    sizes = summary["parameters"]
    frozen = frozen_groups(parse_phases(freeze)[-1].spec, set(sizes))
    return int(sum(n for g, n in sizes.items() if g not in frozen))


def _train_one(cfg: CompareConfig, run: dict, out: Path, names: list[str], finished: int) -> dict:
    """One run of the grid, trained; its result row."""
    run_cfg = dataclasses.replace(
        cfg,
        freeze=run["freeze"],
        seed=run["seed"],
        loss_weighting=run["weighting"],
        out=str(out / "runs" / _run_name(run)),
        overwrite=True,
        resume=False,
    )
    train_cfg = TrainConfig(**{f.name: getattr(run_cfg, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        summary = train_and_evaluate(train_cfg)
    except Interrupted as e:
        raise Interrupted(
            f"compare interrupted during {_run_name(run)}; the {finished} finished runs are in {out / 'results.md'}",
            e.exit_code,
        ) from None
    shutil.rmtree(Path(train_cfg.out) / "checkpoints", ignore_errors=True)  # only the metrics are needed
    row = dict(
        run,
        wall_s=round(summary["wall_s"], 1),
        trainable_params=_trainable(summary, run["freeze"]),
        steps=summary["steps"],
        best_epoch=summary["best_epoch"],
    )
    for t in names:
        for split, short in (("test", "test"), ("validation", "val")):
            for metric in scored(summary["test"][t]):
                row[f"{t}_{short}_{metric}"] = round(summary[split][t][metric], 4)
    return row


def compare(cfg: CompareConfig) -> list[dict]:
    """Run the grid within ``cfg.budget_minutes``; returns the result rows (also written to ``cfg.out``)."""
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    names = [t.name for t in cfg.selected_tasks()]
    runs = plan_runs(cfg, names)
    n_layers = load_encoder(cfg.encoder).config.n_layers
    groups = {"embeddings", *(f"layer_{i}" for i in range(n_layers)), *(f"head:{t}" for t in names)}
    for run in runs:  # every spec is checked before anything runs
        for phase in parse_phases(run["freeze"]):
            frozen_groups(phase.spec, groups)
    out.mkdir(parents=True, exist_ok=True)
    budget = cfg.budget_minutes * 60
    t0 = time.perf_counter()
    rows: list[dict] = []
    skipped: list[dict] = []
    durations: dict[str, list[float]] = {}
    for i, run in enumerate(runs):
        key = f"{run['scenario']}/{run['weighting']}"
        seen = durations.get(key) or [d for ds in durations.values() for d in ds]
        estimate = float(np.mean(seen)) if seen else 0.0
        elapsed = time.perf_counter() - t0
        if elapsed + estimate > budget:
            log(
                f"[{i + 1}/{len(runs)}] skip {_run_name(run)}: would end after ~{(elapsed + estimate) / 60:.0f} min "
                f"(budget {cfg.budget_minutes:g} min)"
            )
            skipped.append(run)
            continue
        log(f"[{i + 1}/{len(runs)}] {_run_name(run)} (freeze {run['freeze']}, {elapsed / 60:.1f} min elapsed)")
        row = _train_one(cfg, run, out, names, len(rows))
        durations.setdefault(key, []).append(row["wall_s"])
        rows.append(row)
        write_results(out, rows, skipped + runs[i + 1 :], names, cfg, final=False)
    write_results(out, rows, skipped, names, cfg, final=True)
    log(f"compare: {len(rows)} runs in {(time.perf_counter() - t0) / 60:.1f} min; results in {out}")
    return rows


def scored(result: dict) -> list[str]:
    """The metrics the table keeps of a task: its primary one, and accuracy beside it where it has one."""
    return [result["primary"]] + (["accuracy"] if "accuracy" in result and result["primary"] != "accuracy" else [])


def task_columns(row: dict, t: str) -> list[str]:
    """A task's test columns of a result row (``test_<metric>``), its primary metric first."""
    return [k[len(t) + 1 :] for k in row if k.startswith(f"{t}_test_")]


def summarize(rows: list[dict], names: list[str]) -> list[dict]:
    """Mean and std over seeds per (scenario, weighting)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["weighting"]), []).append(r)
    out = []
    for (scenario, weighting), rs in groups.items():
        s = {
            "scenario": scenario,
            "weighting": weighting,
            "seeds": len(rs),
            "wall_s": float(np.mean([r["wall_s"] for r in rs])),
            "trainable_params": rs[0]["trainable_params"],
        }
        for t in names:
            for m in task_columns(rs[0], t):
                v = np.array([r[f"{t}_{m}"] for r in rs])
                s[f"{t}_{m}"] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        out.append(s)
    return out


def write_results(
    out: Path, rows: list[dict], pending: list[dict], names: list[str], cfg: CompareConfig, final: bool
) -> None:
    from mtl_jax.outputs.plots import plot_compare

    if rows:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = summarize(rows, names)
    columns = {t: task_columns(rows[0], t) if rows else [] for t in names}
    steps = sorted({r["steps"] for r in rows})
    length = f"{steps[0]} steps" if len(steps) == 1 else f"{steps[0]}-{steps[-1]} steps" if steps else "no runs yet"
    lines = [
        "# Freezing scenarios compared",
        "",
        f"Encoder `{cfg.encoder}`, {length} per run, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"seeds {', '.join(map(str, cfg.seeds))}; test split of seed {cfg.split_seed}. Mean ± std over seeds; "
        f"wall time per run on {jax.default_backend()}.",
        "",
        "| scenario | weighting | seeds | "
        + " | ".join(f"{t} {m[5:]}" for t in names for m in columns[t])
        + " | wall s | trainable params |",
        "|---|---|---|" + "---|" * sum(len(c) for c in columns.values()) + "---|---|",
    ]
    for s in summary:
        cells = [f"{s[f'{t}_{m}'][0]:.3f} ± {s[f'{t}_{m}'][1]:.3f}" for t in names for m in columns[t]]
        lines.append(
            f"| {s['scenario']} | {s['weighting']} | {s['seeds']} | "
            + " | ".join(cells)
            + f" | {s['wall_s']:.0f} | {s['trainable_params']:,} |"
        )
    probe = next((s for s in summary if s["scenario"] == "backbone" and s["weighting"] == "sum"), None)
    if probe is not None and len(summary) > 1:
        lines.append("")
        for t in names:
            key = f"{t}_{columns[t][0]}"  # the primary metric
            best = max(summary, key=lambda s: s[key][0])
            gain = 100 * (best[key][0] - probe[key][0])
            lines.append(
                f"- {t}: best `{best['scenario']}` ({best['weighting']}), {gain:+.1f} points of test "
                f"{columns[t][0][5:]} over the frozen-backbone linear probe."
            )
    if pending:
        lines += [
            "",
            ("Not run (time budget): " if final else "Still to run: ") + ", ".join(_run_name(r) for r in pending) + ".",
        ]
    lines += ["", "![accuracy vs wall time](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"summary": summary, "pending": pending}, indent=2))
    if summary:
        plot_compare(summary, {t: columns[t][0] for t in names}, out / "results.png")
