"""A whole training run: data, model, the fit loop, evaluation and the run directory.

``train_and_evaluate(cfg)`` is what ``scripts/train.py`` calls. Everything that can be
checked (output directory, config, data, encoder) is checked before the first byte is
written into the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.config import TrainConfig
from mtl_jax.data import SPLITS, epoch_plan, load_tasks, make_batch, make_task_batch, probe_indices, task_plan, tokenize
from mtl_jax.errors import Interrupted, MtlError
from mtl_jax.freezing import encoder_frozen, frozen_groups, group_sizes, param_groups, parse_phases, phase_at
from mtl_jax.model import MultiTaskModel, init_params, load_encoder
from mtl_jax.parallel import (
    check_batch_size,
    initialize_distributed,
    is_primary,
    make_mesh,
    place_state,
    replicate,
    shard_batch,
    to_host,
)
from mtl_jax.plots import plot_confusion, plot_curves, plot_gradients
from mtl_jax.text import bucket_lengths
from mtl_jax.train import (
    OptimConfig,
    TrainState,
    accumulate,
    carry_opt_state,
    count_numbers,
    embed_examples,
    evaluate,
    frozen_param_mask,
    make_embed_step,
    make_eval_step,
    make_grad_probe,
    make_optimizer,
    make_train_step,
)

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.md", "curves.png", "gradients.png")


def _log(msg: str) -> None:
    if jax.process_index() == 0:  # one voice in a multi-process run
        tqdm.write(msg, file=sys.stderr)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a directory that holds another run (unless ``overwrite``) or cannot be written."""
    if out.exists() and not out.is_dir():
        raise MtlError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MtlError(f"{out}: already holds files (another run?); pass --overwrite to replace it or choose another --out")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MtlError(f"{parent}: not writable; choose another --out")


def _prepare_out_dir(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for png in out.glob("confusion_*.png"):
        png.unlink()
    for sub in ("checkpoints", "export"):
        shutil.rmtree(out / sub, ignore_errors=True)


def _optim_config(cfg: TrainConfig, total_steps: int) -> OptimConfig:
    return OptimConfig(
        lr=cfg.lr,
        head_lr=cfg.head_lr if cfg.head_lr is not None else 10 * cfg.lr,
        total_steps=total_steps,
        warmup_steps=int(round(cfg.warmup * total_steps)),
        decay=cfg.decay,
        weight_decay=cfg.weight_decay,
        clip_norm=cfg.clip_norm,
        layer_decay=cfg.layer_decay,
    )


def _train_record(total, step: int, epoch: int, tasks) -> dict:
    """Mean loss and per-task loss / accuracy over the steps since the last log (fetches from device)."""
    m = jax.device_get(total)
    rec = {"step": step, "epoch": epoch, "split": "train", "loss": float(m["loss"]) / max(int(m["steps"]), 1),
           "skipped": int(m["skipped"])}
    for t in tasks:
        c = int(m["tasks"][t]["count"])
        rec[t] = {
            "loss": float(m["tasks"][t]["loss_sum"]) / c if c else None,
            "accuracy": float(m["tasks"][t]["correct"]) / c if c else None,
            "examples": c,
        }
    return rec


def _eval_record(results: dict, step: int, epoch: int, split: str) -> dict:
    rec = {"step": step, "epoch": epoch, "split": split, "loss": sum(r["loss"] for r in results.values())}
    for t, r in results.items():
        rec[t] = {k: r[k] for k in ("loss", "accuracy", "macro_f1", "examples")}
    rec["mean_macro_f1"] = float(np.mean([r["macro_f1"] for r in results.values()]))
    return rec


# Options that must not change when a run is resumed (they change the data or the model).
RESUME_FIXED = ("encoder", "tasks", "freeze", "batch_size", "seed", "max_length", "sampling", "temperature",
                "pooling", "dtype", "lr", "head_lr", "warmup", "decay", "weight_decay", "layer_decay", "task_list",
                "loss_weighting", "split_seed")


def _check_resumable(out: Path, cfg: TrainConfig) -> None:
    saved_path = out / "config.json"
    if not saved_path.is_file():
        raise MtlError(f"{saved_path}: missing; --resume needs the --out of an earlier run")
    saved = json.loads(saved_path.read_text())
    now = cfg.to_json()
    changed = [k for k in RESUME_FIXED if saved.get(k) != now.get(k)]
    if changed:
        raise MtlError(f"{saved_path}: --resume with different {', '.join(changed)}; use the original options")


def _gradient_record(probe_out, step: int, epoch: int, tasks) -> dict:
    """Task-gradient diagnostics on the probe batch: per-task loss and encoder gradient norm, pairwise cosines."""
    m = jax.device_get(probe_out)
    rec = {"step": step, "epoch": epoch, "split": "gradients", "loss": float(np.sum(m["loss"]))}
    for i, t in enumerate(tasks):
        rec[t] = {"loss": float(m["loss"][i]), "grad_norm": float(m["grad_norm"][i])}
    rec["cosine"] = {f"{a}|{b}": float(m["cosine"][i, j]) for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j}
    return rec


def _zero_metrics(names) -> dict:
    z = lambda dtype: jnp.zeros((), dtype)  # noqa: E731
    return {"loss": z(jnp.float32), "steps": z(jnp.int32), "skipped": z(jnp.int32), "streak": z(jnp.int32),
            "tasks": {t: {"loss_sum": z(jnp.float32), "correct": z(jnp.int32), "count": z(jnp.int32)} for t in names}}


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train on ``cfg``'s tasks, keep the best epoch by mean validation macro-F1, test it, export it."""
    from mtl_jax.checkpoint import Checkpoints, export_model, restore_latest

    wall0 = time.perf_counter()
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    primary = is_primary()  # process 0 writes the run directory; every process trains
    out = Path(cfg.out)
    if cfg.resume:
        _check_resumable(out, cfg)
    else:
        check_out_dir(out, cfg.overwrite)
    tasks = cfg.selected_tasks()
    phases = parse_phases(cfg.freeze)
    if cfg.batch_size < 1 or cfg.epochs < 1 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise MtlError("--batch-size, --epochs and --max-steps must be positive")
    data = load_tasks(tasks, seed=cfg.resolved_split_seed(), skip_bad_rows=cfg.skip_bad_rows)
    encoder = load_encoder(cfg.encoder)
    max_length = min(cfg.max_length, encoder.spec.max_length)
    tokenized = {s: tokenize(data.splits[s], encoder.tokenizer, max_length) for s in SPLITS}
    names = data.names
    model = MultiTaskModel(
        encoder.config,
        tasks=tuple((t, len(data.labels[t])) for t in names),
        pooling=cfg.pooling or encoder.spec.pooling,
        head_dropout=cfg.head_dropout,
        dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
    )
    mesh = make_mesh()
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh, "--eval-batch-size")
    if cfg.loss_weighting == "pcgrad":  # each task's sub-batch is split over the devices
        check_batch_size(cfg.batch_size // len(tasks), mesh, f"--batch-size / {len(tasks)} tasks")
    rng = jax.random.PRNGKey(cfg.seed)
    params = init_params(model, encoder.params, jax.random.fold_in(rng, 1))
    if cfg.loss_weighting == "uncertainty":
        params["loss_weights"] = {t: jnp.zeros((), jnp.float32) for t in names}  # log-variances, start at weight 1
    groups = set(jax.tree.leaves(param_groups(params)))
    frozen_by_phase = [frozen_groups(p.spec, groups) for p in phases]
    train = tokenized["train"]
    stacked = cfg.loss_weighting == "pcgrad"  # every step holds every task

    def plan_for(epoch: int) -> list:
        if stacked:
            return task_plan(train, cfg.batch_size, cfg.seed, epoch)
        return epoch_plan(train, cfg.batch_size, cfg.seed, epoch, cfg.sampling, cfg.temperature)

    steps_per_epoch = len(plan_for(0))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optim = _optim_config(cfg, total_steps)
    weights = {t.name: t.weight for t in tasks}
    sizes = group_sizes(params)

    def build(frozen_set):
        tx = make_optimizer(params, frozen_set, optim, encoder.config.n_layers)
        return tx, make_train_step(model, tx, weights, frozen_param_mask(params, frozen_set), cfg.loss_weighting,
                                   encoder_frozen(frozen_set, groups))

    def describe(frozen_set, phase):
        frozen_n = sum(sizes[g] for g in frozen_set)
        per_label = ", ".join(f"{g}={'frozen' if g in frozen_set else 'train'}:{n:,}" for g, n in sorted(sizes.items()))
        _log(f"phase {phase} ({phases[phase].spec}): {sum(sizes.values()) - frozen_n:,} trainable, {frozen_n:,} frozen [{per_label}]")

    def phase_end(step: int) -> int:
        """The step at which the phase in force at ``step`` ends (the next phase boundary, or the end)."""
        starts = [p.start * (steps_per_epoch if p.unit == "epoch" else 1) for p in phases[1:]]
        return min([s for s in starts if s > step] + [total_steps])

    def cached_data(phase: int, step: int, current_params) -> dict | None:
        """Train / validation with cached embeddings when the whole encoder stays frozen for an epoch or more."""
        if not (cfg.cache_embeddings and encoder_frozen(frozen_by_phase[phase], groups)):
            return None
        if phase_end(step) - step < steps_per_epoch:
            return None  # each example would be seen at most once: encoding them all first saves nothing
        todo = {s: tokenized[s] for s in ("train", "validation")}
        t0 = time.perf_counter()
        with tqdm(total=sum(len(d) for d in todo.values()), disable=not cfg.progress, unit="ex",
                  desc="caching embeddings", leave=False, file=sys.stderr) as cache_bar:
            out = {s: dataclasses.replace(d, embeddings=embed_examples(
                embed_step, current_params, d, cfg.eval_batch_size, max_length, pad_id, mesh, cache_bar))
                for s, d in todo.items()}
        _log(f"phase {phase}: encoder frozen; cached the embeddings of {sum(len(d) for d in todo.values())} "
             f"examples in {time.perf_counter() - t0:.1f}s; the heads train on them")
        return out

    def checkpoint_target(meta: dict) -> dict:
        tx_ = make_optimizer(params, frozen_by_phase[meta["phase"]], optim, encoder.config.n_layers)
        # restored arrays take the target's (mesh) shardings
        return {"state": place_state(TrainState.create(params, tx_.init(params)), mesh, cfg.fsdp),
                "metrics": replicate(_zero_metrics(names), mesh), "rng": replicate(rng, mesh)}

    # ---- inputs are valid: from here on the run directory is written
    if jax.process_count() > 1:  # no process writes before every process has checked
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mtl_jax: inputs checked")
    if not cfg.resume and primary:
        _prepare_out_dir(out)
        (out / "config.json").write_text(
            json.dumps(cfg.to_json() | {"labels": data.labels, "resolved_max_length": max_length}, indent=2)
        )
    for note in data.notes:
        _log(note)
    for s in SPLITS:
        per_task = {t: int((tokenized[s].labels[:, i] >= 0).sum()) for i, t in enumerate(names)}
        _log(f"{s}: {len(tokenized[s])} examples {per_task}, {tokenized[s].truncated} truncated at {max_length} tokens")
    _log(f"backend {jax.default_backend()} ({mesh.devices.size} device(s), batch split over them); {steps_per_epoch} steps/epoch, {total_steps} steps")

    ckpts = Checkpoints(out / "checkpoints", keep=cfg.keep)
    buckets = bucket_lengths(max_length)
    pad_id = encoder.tokenizer.pad_id
    eval_step = make_eval_step(model)
    embed_step = make_embed_step(model)
    probe = make_grad_probe(model) if cfg.grad_diagnostics > 0 else None
    probe_batch = None
    if probe is not None:
        probe_batch = shard_batch(make_task_batch(train, probe_indices(train, cfg.batch_size, cfg.seed),
                                                  max(1, cfg.batch_size // len(names)), buckets, pad_id), mesh)
    records: list[dict] = []
    meta = {"epoch": 0, "offset": 0, "phase": phase_at(phases, 0, 0), "records": 0, "best_score": -1.0,
            "best_epoch": -1, "best_step": -1, "train_seconds": 0.0, "examples_seen": 0, "n_log": 0}
    total = _zero_metrics(names)
    phase_i = meta["phase"]
    frozen = frozen_by_phase[phase_i]
    tx, train_step = build(frozen)
    state = TrainState.create(params, tx.init(params))
    if cfg.resume:
        restored = restore_latest(ckpts, checkpoint_target, _log)
        if restored is None:
            _log(f"{ckpts.folder}: no intact checkpoint; starting from step 0")
        else:
            tree, meta, ckpt_step = restored
            state, total = tree["state"], tree["metrics"]
            phase_i = meta["phase"]
            frozen = frozen_by_phase[phase_i]
            tx, train_step = build(frozen)
            _log(f"resumed from {ckpts.folder / str(ckpt_step)} (epoch {meta['epoch'] + 1}, step {int(state.step)})")
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        records = [json.loads(line) for line in lines[: meta["records"]]]
    state = place_state(state, mesh, cfg.fsdp)
    metrics_file = open(out / "metrics.jsonl" if primary else os.devnull, "w")
    for rec in records:
        metrics_file.write(json.dumps(rec) + "\n")
    metrics_file.flush()

    def emit(rec: dict) -> None:
        records.append(rec)
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    def save(epoch: int, offset: int, n_log: int, score: float | None = None) -> None:
        meta.update(epoch=epoch, offset=offset, phase=phase_i, records=len(records), n_log=n_log,
                    train_seconds=train_seconds, examples_seen=examples_seen)
        # (replicated over the mesh: orbax saves only global arrays in a multi-process run)
        ckpts.save(int(state.step), {"state": state, "metrics": replicate(total, mesh), "rng": replicate(rng, mesh)}, meta, score)

    describe(frozen, phase_i)
    _log(f"optimizer state: {count_numbers(state.opt_state):,} numbers")
    cache, cache_phase = None, None  # cached embeddings, and the phase they were made for
    step = int(state.step)
    train_seconds, examples_seen = meta["train_seconds"], meta["examples_seen"]
    best_params = None  # host copy of the best epoch's params when it was trained in this process
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and primary), unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        for epoch in range(meta["epoch"], epochs):
            if step >= total_steps:  # resuming a run that already finished
                break
            plan = plan_for(epoch)
            t_epoch = time.perf_counter()
            offset = meta["offset"] if epoch == meta["epoch"] else 0
            t_log, n_log = time.perf_counter(), meta["n_log"] if epoch == meta["epoch"] else 0
            meta["n_log"] = 0
            last = None
            position = offset  # batches of this epoch's plan consumed so far
            for b, idx in enumerate(plan[offset:], start=offset):
                if step >= total_steps:
                    break
                new_phase = phase_at(phases, step, epoch)
                if new_phase != phase_i:
                    new_frozen = frozen_by_phase[new_phase]
                    new_tx, new_step = build(new_frozen)
                    opt_state = carry_opt_state(state.opt_state, new_tx.init(state.params), frozen, new_frozen)
                    state = state.replace(opt_state=place_state(opt_state, mesh, cfg.fsdp))
                    phase_i, frozen, tx, train_step = new_phase, new_frozen, new_tx, new_step
                    describe(frozen, phase_i)
                if cache_phase != phase_i:  # (inside the epoch's clock: caching is part of its cost)
                    cache, cache_phase = cached_data(phase_i, step, state.params), phase_i
                source = cache["train"] if cache else train
                if stacked:
                    arrays = make_task_batch(source, idx, cfg.batch_size // len(names), buckets, pad_id)
                else:
                    arrays = make_batch(source, idx, cfg.batch_size, buckets, pad_id).arrays()
                if probe is not None and step % cfg.grad_diagnostics == 0:
                    emit(_gradient_record(probe(state.params, probe_batch), step, epoch, names))
                state, m = train_step(state, shard_batch(arrays, mesh), rng)
                total = accumulate(total, m)
                if last is not None and int(last["streak"]) >= cfg.max_nonfinite:  # one step behind: no stall
                    raise MtlError(
                        f"step {step}: loss or gradients non-finite for {int(last['streak'])} consecutive steps "
                        f"(each skipped); stopping without saving. Lower --lr or check the data"
                    )
                last = m
                step += 1
                position = b + 1
                n_log += sum(len(i) for i in idx) if stacked else len(idx)
                bar.update(1)
                end_of_epoch = b == len(plan) - 1 or step == total_steps
                if step % cfg.log_every == 0 or end_of_epoch:
                    rec = _train_record(total, step, epoch, names)  # waits for the queued steps
                    seconds = time.perf_counter() - t_log
                    train_seconds += seconds
                    examples_seen += n_log
                    if rec["skipped"]:
                        _log(f"step {step}: skipped {rec['skipped']} update(s) with a non-finite loss or gradient")
                    emit(rec)
                    bar.set_postfix_str(
                        " ".join(f"{t}={rec[t]['loss']:.3f}" for t in names if rec[t]["loss"] is not None)
                        + f" {n_log / max(seconds, 1e-9):.0f}ex/s"
                    )
                    total, t_log, n_log = _zero_metrics(names), time.perf_counter(), 0
                if stop["signal"] is not None and not end_of_epoch:
                    save(epoch, b + 1, n_log)
                    raise _interrupted(stop["signal"], step, out, ckpts)
                if cfg.save_every and step % cfg.save_every == 0 and not end_of_epoch:
                    save(epoch, b + 1, n_log)
            if last is not None and int(last["streak"]) >= cfg.max_nonfinite:
                raise MtlError(f"step {step}: loss or gradients non-finite for {int(last['streak'])} consecutive steps; stopping without saving")
            epoch_s = time.perf_counter() - t_epoch
            val_data = cache["validation"] if cache else tokenized["validation"]
            results = evaluate(eval_step, state.params, val_data, data.labels, cfg.eval_batch_size, max_length, pad_id, mesh)
            rec = _eval_record(results, step, epoch, "validation") | {"epoch_s": round(epoch_s, 3)}
            emit(rec)
            _log(
                f"epoch {epoch + 1}/{epochs} validation: "
                + ", ".join(f"{t} acc {results[t]['accuracy']:.3f} F1 {results[t]['macro_f1']:.3f}" for t in names)
            )
            if rec["mean_macro_f1"] > meta["best_score"]:
                meta.update(best_score=rec["mean_macro_f1"], best_epoch=epoch, best_step=step)
                best_params = to_host(state.params)
            # a --max-steps stop mid-epoch keeps its place, so a longer --resume continues this epoch
            save(*((epoch + 1, 0) if position == len(plan) else (epoch, position)), 0, score=rec["mean_macro_f1"])
            if stop["signal"] is not None:
                raise _interrupted(stop["signal"], step, out, ckpts)
    finally:
        bar.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if best_params is None:  # the best epoch was trained before a resume: take it from its checkpoint
        tree, _ = ckpts.restore(meta["best_step"], checkpoint_target(ckpts.restore_meta(meta["best_step"])))
        best_params = tree["state"].params
    ckpts.close()
    summary = {"best_epoch": meta["best_epoch"] + 1, "steps": step}
    for split in ("validation", "test"):
        results = evaluate(eval_step, best_params, tokenized[split], data.labels, cfg.eval_batch_size, max_length, pad_id, mesh)
        summary[split] = results
        if split == "test":
            emit(_eval_record(results, step, meta["best_epoch"], "test"))
    metrics_file.close()
    summary["examples_per_s"] = examples_seen / max(train_seconds, 1e-9)
    summary["wall_s"] = time.perf_counter() - wall0
    summary["train_seconds"] = train_seconds
    summary["backend"] = jax.default_backend()
    summary["truncated"] = {s: tokenized[s].truncated for s in SPLITS}
    summary["parameters"] = sizes
    if "loss_weights" in best_params:  # learned (uncertainty): the effective weight exp(-s) per task
        summary["loss_weights"] = {t: float(np.exp(-np.asarray(s))) for t, s in best_params["loss_weights"].items()}
    if not primary:
        return summary
    if cfg.export:
        spec = dataclasses.replace(encoder.spec, max_length=max_length)
        export_model(out / "export", spec, best_params["encoder"], best_params["heads"], encoder.hf_tokenizer,
                     [(t, data.labels[t]) for t in names], model.pooling)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(records, names, out / "curves.png")
    if any(r["split"] == "gradients" for r in records):
        plot_gradients(records, names, out / "gradients.png")
    for t in names:
        plot_confusion(summary["test"][t]["confusion"], data.labels[t], f"{t} (test)", out / f"confusion_{t}.png")
    (out / "report.md").write_text(_report(cfg, summary, names, data.labels))
    _log(
        f"best epoch {summary['best_epoch']}; test: "
        + ", ".join(f"{t} acc {summary['test'][t]['accuracy']:.3f} F1 {summary['test'][t]['macro_f1']:.3f}" for t in names)
        + f"; {summary['wall_s']:.0f}s; outputs in {out}"
    )
    return summary


def _interrupted(signum: int, step: int, out: Path, ckpts) -> Interrupted:
    ckpts.close()
    name = signal.Signals(signum).name
    return Interrupted(
        f"{name} at step {step}: checkpoint saved; resume with: python scripts/train.py --out {out} --resume "
        f"(plus the same options)",
        128 + signum,
    )


def _report(cfg: TrainConfig, summary: dict, names, labels) -> str:
    lines = [
        f"# Run report: {cfg.out}",
        "",
        f"Encoder `{cfg.encoder}`, freeze `{cfg.freeze}`, {summary['steps']} steps, batch {cfg.batch_size}, "
        f"lr {cfg.lr}, seed {cfg.seed}, dtype {cfg.dtype}, loss weighting {cfg.loss_weighting}, backend {summary['backend']}.",
        f"Best epoch {summary['best_epoch']} (mean validation macro-F1); wall time {summary['wall_s']:.0f} s, "
        f"{summary['examples_per_s']:.1f} training examples/s.",
    ]
    if "loss_weights" in summary:
        lines.append("Learned loss weights exp(-s): " + ", ".join(f"{t} {w:.3f}" for t, w in summary["loss_weights"].items()) + ".")
    lines += [
        "",
        "| task | split | accuracy | macro-F1 | examples |",
        "|---|---|---|---|---|",
    ]
    for t in names:
        for split in ("validation", "test"):
            r = summary[split][t]
            lines.append(f"| {t} | {split} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['examples']} |")
    for t in names:
        r = summary["test"][t]
        lines += ["", f"## {t} (test)", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name in labels[t]:
            lines.append(f"| {name} | {r['precision'][name]:.3f} | {r['recall'][name]:.3f} | {r['f1'][name]:.3f} | {r['support'][name]} |")
        lines.append(f"\n![confusion](confusion_{t}.png)")
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)
