"""A whole training run: ``train_and_evaluate(cfg)``, what ``scripts/train.py`` calls.

It reads top to bottom: :func:`setup` checks every input and builds the run (data,
model, input pipeline, phases) before the first byte is written into the run directory;
:class:`Trainer` holds the train state and the typed :class:`LoopState` (what a checkpoint
saves and restores) and runs ``train_epoch`` then ``evaluate_and_checkpoint`` per epoch;
``finish`` tests the best parameters and writes the summary, export, plots and report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.config import TrainConfig, resume_fixed
from mtl_jax.data.batching import InputPipeline, tokenize
from mtl_jax.data.load import SPLITS, TaskData, load_tasks
from mtl_jax.errors import Interrupted, MtlError
from mtl_jax.inference import SentenceEncoder, load_encoder
from mtl_jax.model.lora import LoRA, with_lora
from mtl_jax.model.multitask import MultiTaskModel, init_params
from mtl_jax.outputs.report import (
    eval_record,
    gradient_record,
    mean_score,
    scalar_series,
    train_record,
    write_outputs,
    write_summary,
)
from mtl_jax.training import weighting as loss_weighting
from mtl_jax.training.checkpoint import Checkpoints, restore_latest
from mtl_jax.training.compile_cache import RunClock, use_compile_cache
from mtl_jax.training.evaluation import embed_all, evaluate
from mtl_jax.training.freezing import (
    Phase,
    encoder_frozen,
    frozen_groups,
    group_sizes,
    param_groups,
    parse_phases,
    phase_at,
    phase_end,
    phase_starts,
)
from mtl_jax.training.optim import OptimConfig, carry_opt_state, count_numbers
from mtl_jax.training.parallel import (
    check_batch_size,
    initialize_distributed,
    is_primary,
    make_mesh,
    place_state,
    replicate,
    to_host,
)
from mtl_jax.training.steps import (
    TrainState,
    accumulate,
    build_train_step,
    make_embed_step,
    make_eval_step,
    make_grad_probe,
    zero_metrics,
)

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.md", "curves.png", "gradients.png")
CHECKPOINT_FORMAT = 4  # 2: named optimizer state, typed loop state; 3: loss-weighting state; 4: its NamedTuple states


def log(msg: str) -> None:
    if jax.process_index() == 0:  # one voice in a multi-process run
        tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------------- the run directory


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a directory that holds another run (unless ``overwrite``) or cannot be written."""
    if out.exists() and not out.is_dir():
        raise MtlError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MtlError(
            f"{out}: already holds files (another run?); pass --overwrite to replace it or choose another --out"
        )
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MtlError(f"{parent}: not writable; choose another --out")


def check_resumable(out: Path, cfg: TrainConfig) -> None:
    """The run in ``out`` exists and was started with the same options that fix its result."""
    saved_path = out / "config.json"
    if not saved_path.is_file():
        raise MtlError(f"{saved_path}: missing; --resume needs the --out of an earlier run")
    saved = json.loads(saved_path.read_text())
    now = cfg.to_json()
    changed = [
        f"--{k.replace('_', '-')} (was {saved.get(k)!r}, now {now.get(k)!r})"
        for k in resume_fixed()
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise MtlError(f"{saved_path}: --resume with a different {', '.join(changed)}; use the original options")


def _prepare_out_dir(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for png in out.glob("confusion_*.png"):
        png.unlink()
    for sub in ("checkpoints", "export", "tensorboard"):
        shutil.rmtree(out / sub, ignore_errors=True)


# ---------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything fixed for the whole run, built by :func:`setup` before anything is written."""

    cfg: TrainConfig
    out: Path
    data: TaskData
    encoder: SentenceEncoder
    model: MultiTaskModel
    pipeline: InputPipeline
    params: Any  # the initial parameters (pretrained encoder, fresh heads)
    rng: jax.Array
    phases: list[Phase]
    frozen_by_phase: list[frozenset[str]]
    steps_per_epoch: int
    total_steps: int
    optim: OptimConfig
    weighting: loss_weighting.Method

    @property
    def names(self) -> tuple[str, ...]:
        return self.data.names

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @functools.cached_property
    def starts(self) -> list[int]:
        """The step each phase starts at (read on every step)."""
        return phase_starts(self.phases, self.steps_per_epoch)

    @property
    def mesh(self):
        return self.pipeline.mesh

    def encoder_frozen(self, phase: int) -> bool:
        return encoder_frozen(self.frozen_by_phase[phase], set(jax.tree.leaves(param_groups(self.params))))


def setup(cfg: TrainConfig) -> Run:
    """Check the options, the run directory, the data and the encoder; build the model and pipeline."""
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    use_compile_cache(cfg.compile_cache)
    out = Path(cfg.out)
    if cfg.resume:
        check_resumable(out, cfg)
    else:
        check_out_dir(out, cfg.overwrite)
    cfg.check()
    tasks = cfg.selected_tasks()
    phases = parse_phases(cfg.freeze)
    data = load_tasks(tasks, seed=cfg.resolved_split_seed(), skip_bad_rows=cfg.skip_bad_rows)
    encoder = load_encoder(cfg.encoder)
    max_length = min(cfg.max_length, encoder.spec.max_length)
    lora = LoRA.from_config(cfg.lora_config()) if any(p.spec.strip() == "lora" for p in phases) else None
    model = MultiTaskModel(
        with_lora(encoder.config, lora),
        tasks=tuple((t.name, t.outputs) for t in data.tasks),
        pooling=cfg.pooling or encoder.spec.pooling,
        head_dropout=cfg.head_dropout,
        dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
        attention=cfg.attention,
    )
    mesh = make_mesh()
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh, "--eval-batch-size")
    weighting = loss_weighting.make(cfg.weighting_config(), tuple(t.weight for t in tasks))
    if weighting.every_task:  # each task's sub-batch is split over the devices
        check_batch_size(cfg.batch_size // len(tasks), mesh, f"--batch-size / {len(tasks)} tasks")
    pipeline = InputPipeline(
        {s: tokenize(data.splits[s], encoder.tokenizer, max_length) for s in SPLITS},
        encoder.tokenizer.pad_id,
        max_length,
        cfg.batch_size,
        cfg.eval_batch_size,
        cfg.seed,
        epochs=cfg.epochs,
        sampling=cfg.sampling,
        temperature=cfg.temperature,
        task_stacked=weighting.every_task,
        grad_accum=cfg.grad_accum,
        mesh=mesh,
    )
    rng = jax.random.PRNGKey(cfg.seed)
    params = weighting.add_params(init_params(model, encoder.params, jax.random.fold_in(rng, 1)), data.names)
    groups = set(jax.tree.leaves(param_groups(params)))
    frozen_by_phase = [frozen_groups(p.spec, groups) for p in phases]
    if cfg.patience and len(pipeline.splits["validation"]) == 0:
        raise MtlError(f"--patience {cfg.patience}: there is no validation data to stop on")
    steps_per_epoch = len(pipeline.plan(0))
    if cfg.dwa_period is None:  # DWA's period: one epoch, as in the paper
        weighting = loss_weighting.make(cfg.weighting_config(), weighting.task_weights, dwa_period=steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return Run(
        cfg,
        out,
        data,
        encoder,
        model,
        pipeline,
        params,
        rng,
        phases,
        frozen_by_phase,
        steps_per_epoch,
        total_steps,
        OptimConfig.from_config(cfg, total_steps),
        weighting,
    )


def _write_run_start(run: Run) -> None:
    """The run directory's config.json, and what the data and devices are, in the log."""
    cfg, pipeline = run.cfg, run.pipeline
    if jax.process_count() > 1:  # no process writes before every process has checked
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mtl_jax: inputs checked")
    if not cfg.resume and is_primary():
        _prepare_out_dir(run.out)
        resolved = {"labels": run.data.labels, "resolved_max_length": pipeline.max_length}
        (run.out / "config.json").write_text(json.dumps(cfg.to_json() | resolved, indent=2))
    for note in run.data.notes:
        log(note)
    for s in SPLITS:
        d = pipeline.splits[s]
        per_task = {t: int((d.labels[:, i] >= 0).sum()) for i, t in enumerate(run.names)}
        log(f"{s}: {len(d)} examples {per_task}, {d.truncated} truncated at {pipeline.max_length} tokens")
    log(
        f"backend {jax.default_backend()} ({run.mesh.devices.size} device(s), batch split over them); "
        f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps"
    )


# ---------------------------------------------------------------------------- the loop


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint saves (as JSON) beside the train state, and restores."""

    epoch: int = 0  # the epoch in progress
    position: int = 0  # batches of that epoch's plan consumed
    phase: int = 0  # the freezing phase in force
    records: int = 0  # metrics.jsonl records written
    n_log: int = 0  # training examples since the last training record
    best_score: float = -1.0  # the best evaluation's mean primary score (none yet: best_step -1)
    best_epoch: int = -1
    best_step: int = -1
    since_best: int = 0  # evaluations since the best one (--patience)
    stopped_early: bool = False
    train_seconds: float = 0.0
    examples_seen: int = 0
    format: int = CHECKPOINT_FORMAT

    @classmethod
    def from_meta(cls, meta: dict, where: Path) -> LoopState:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise MtlError(
                f"{where}: checkpoint written by another mtl_jax version (checkpoint format "
                f"{meta.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); it cannot resume it: start the run again"
            )
        return cls(**meta)


@dataclass
class Trainer:
    """The train state and the loop over epochs; hooks for evaluation, checkpoints and signals."""

    run: Run
    ckpts: Checkpoints
    clock: RunClock = field(default_factory=RunClock)
    state: TrainState = None
    loop: LoopState = field(default_factory=LoopState)
    records: list = field(default_factory=list)
    totals: Any = None  # running metric sums since the last training record (on the device)
    train_step: Callable = None
    cache: dict | None = None  # cached embeddings of the phase in ``cache_phase``
    cache_phase: int | None = None
    best_params: Any = None  # host copy of the best epoch's params, when trained in this process
    stop_signal: int | None = None
    step: int = 0  # steps taken: state.step, counted on the host (reading the device's would wait for it)
    shapes: dict = field(default_factory=dict)  # {compiled function: batch shapes it was called with}

    def __post_init__(self):
        run = self.run
        self.eval_step = self.noting_shapes(make_eval_step(run.model, run.data.tasks), "evaluation")
        self.embed_step = self.noting_shapes(make_embed_step(run.model), "embedding cache")
        self.probe = None
        if run.cfg.grad_diagnostics > 0:
            self.probe = self.noting_shapes(make_grad_probe(run.model, run.data.tasks), "gradient probe")
        self.probe_batch = run.pipeline.probe_batch() if self.probe is not None else None
        self.loop.phase = phase_at(run.starts, 0)
        self.totals = zero_metrics(run.names)
        tx, self.train_step = self.build(self.loop.phase)
        self.state = TrainState.create(run.params, tx.init(run.params), run.weighting.init(len(run.names)))

    def build(self, phase: int):
        run = self.run
        tx, step = build_train_step(
            run.model,
            run.params,
            run.frozen_by_phase[phase],
            run.optim,
            run.weighting,
            run.cfg.grad_accum,
            run.data.tasks,
        )
        return tx, self.noting_shapes(step, f"train step, phase {phase} ({run.phases[phase].spec})")

    def noting_shapes(self, fn: Callable, name: str) -> Callable:
        """``fn(first, batch, ...)`` that also notes ``batch``'s shape under ``name`` (a new shape: a compile)."""
        seen = self.shapes.setdefault(name, set())

        def call(first, batch, *rest):
            seen.add(batch.shape)
            return fn(first, batch, *rest)

        return call

    def describe(self, phase: int) -> None:
        sizes, frozen = group_sizes(self.run.params), self.run.frozen_by_phase[phase]
        frozen_n = sum(sizes[g] for g in frozen)
        per_label = ", ".join(f"{g}={'frozen' if g in frozen else 'train'}:{n:,}" for g, n in sorted(sizes.items()))
        log(
            f"phase {phase} ({self.run.phases[phase].spec}): {sum(sizes.values()) - frozen_n:,} trainable, "
            f"{frozen_n:,} frozen [{per_label}]"
        )

    def enter_phase(self, phase: int) -> None:
        """Rebuild the optimizer and step for a new freezing phase, carrying the Adam state over."""
        run = self.run
        tx, self.train_step = self.build(phase)
        old, new = run.frozen_by_phase[self.loop.phase], run.frozen_by_phase[phase]
        opt_state = carry_opt_state(self.state.opt_state, tx.init(self.state.params), old, new)
        self.state = self.state.replace(opt_state=place_state(opt_state, run.mesh, run.cfg.fsdp))
        self.loop.phase = phase
        self.describe(phase)

    # ---- checkpoints

    def checkpoint_target(self, meta: dict) -> dict:
        """A tree shaped like a saved checkpoint of phase ``meta["phase"]``, placed on the mesh."""
        run = self.run
        tx, _ = self.build(meta["phase"])
        # restored arrays take the target's (mesh) shardings
        return {
            "state": place_state(
                TrainState.create(run.params, tx.init(run.params), run.weighting.init(len(run.names))),
                run.mesh,
                run.cfg.fsdp,
            ),
            "metrics": replicate(zero_metrics(run.names), run.mesh),
            "rng": replicate(run.rng, run.mesh),
        }

    def save(self, score: float | None = None) -> None:
        self.loop.records = len(self.records)
        # (replicated over the mesh: orbax saves only global arrays in a multi-process run)
        tree = {
            "state": self.state,
            "metrics": replicate(self.totals, self.run.mesh),
            "rng": replicate(self.run.rng, self.run.mesh),
        }
        with self.clock.part("checkpoint"):
            self.ckpts.save(self.step, tree, dataclasses.asdict(self.loop), score)

    def restore(self) -> None:
        """Continue from the newest intact checkpoint (and the metrics.jsonl records it had written)."""
        restored = restore_latest(self.ckpts, self.checkpoint_target, log)
        if restored is None:
            log(f"{self.ckpts.folder}: no intact checkpoint; starting from step 0")
        else:
            tree, meta, ckpt_step = restored
            self.loop = LoopState.from_meta(meta, self.ckpts.folder / str(ckpt_step))
            self.state, self.totals, self.step = tree["state"], tree["metrics"], int(tree["state"].step)
            _, self.train_step = self.build(self.loop.phase)
            log(f"resumed from {self.ckpts.folder / str(ckpt_step)} (epoch {self.loop.epoch + 1}, step {self.step})")
        path = self.run.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        self.records = [json.loads(line) for line in lines[: self.loop.records]]

    # ---- records

    def open_metrics(self) -> None:
        self.metrics_file = open(self.run.out / "metrics.jsonl" if is_primary() else os.devnull, "w")
        for rec in self.records:
            self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        self.tensorboard = None
        if is_primary():
            from tensorboardX import SummaryWriter

            # a resumed run: TensorBoard drops the earlier files' events from the first re-logged step on
            resumed = self.records[-1]["step"] + 1 if self.records else None
            self.tensorboard = SummaryWriter(str(self.run.out / "tensorboard"), purge_step=resumed, flush_secs=10)

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for tag, value in scalar_series(rec):
                self.tensorboard.add_scalar(tag, value, rec["step"])

    def close_metrics(self) -> None:
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def cached_data(self, step: int) -> dict | None:
        """Train / validation with cached embeddings when the whole encoder stays frozen for an epoch or more."""
        run, phase = self.run, self.loop.phase
        if not (run.cfg.cache_embeddings and run.encoder_frozen(phase)):
            return None
        if phase_end(run.starts, step, run.total_steps) - step < run.steps_per_epoch:
            return None  # each example would be seen at most once: encoding them all first saves nothing
        todo = {s: run.pipeline.splits[s] for s in ("train", "validation")}
        t0 = time.perf_counter()
        with tqdm(
            total=sum(len(d) for d in todo.values()),
            disable=not run.cfg.progress,
            unit="ex",
            desc="caching embeddings",
            leave=False,
            file=sys.stderr,
        ) as bar:
            out = {
                s: dataclasses.replace(
                    d, embeddings=embed_all(self.embed_step, self.state.params, run.pipeline, d, bar)
                )
                for s, d in todo.items()
            }
        log(
            f"phase {phase}: encoder frozen; cached the embeddings of {sum(len(d) for d in todo.values())} "
            f"examples in {time.perf_counter() - t0:.1f}s; the heads train on them"
        )
        return out

    def check_nonfinite(self, metrics) -> None:
        """Stop when the last ``--max-nonfinite`` steps all had a non-finite loss or gradient."""
        if metrics is not None and int(metrics["streak"]) >= self.run.cfg.max_nonfinite:
            raise MtlError(
                f"step {self.step}: loss or gradients non-finite for {int(metrics['streak'])} consecutive "
                f"steps (each skipped); stopping without saving. Lower --lr or check the data"
            )

    # ---- one epoch

    def train_epoch(self, epoch: int, bar) -> None:
        """Train from ``loop.position`` to the end of ``epoch``'s plan (or the run's last step)."""
        run, loop, cfg = self.run, self.loop, self.run.cfg
        plan = run.pipeline.plan(epoch)
        t_log, last = time.perf_counter(), None
        for b in range(loop.position, len(plan)):
            if self.step >= run.total_steps:
                break
            step = self.step
            if (phase := phase_at(run.starts, step)) != loop.phase:
                self.enter_phase(phase)
            if self.cache_phase != loop.phase:  # (inside the epoch's clock: caching is part of its cost)
                self.cache, self.cache_phase = self.cached_data(step), loop.phase
            batch = run.pipeline.train_batch(plan[b], self.cache["train"] if self.cache else None)
            if self.probe is not None and step % cfg.grad_diagnostics == 0:
                self.emit(gradient_record(self.probe(self.state.params, self.probe_batch), step, epoch, run.names))
            self.state, m = self.train_step(self.state, batch, run.rng)
            self.totals = accumulate(self.totals, m)
            self.check_nonfinite(last)  # one step behind: the host does not wait for the step just queued
            last, self.step = m, step + 1
            loop.position, loop.n_log = b + 1, loop.n_log + run.pipeline.examples_in(plan[b])
            bar.update(1)
            end_of_epoch = b == len(plan) - 1 or step + 1 == run.total_steps
            if (step + 1) % cfg.log_every == 0 or end_of_epoch:
                t_log = self.log_training(epoch, t_log, bar)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not end_of_epoch:
                self.evaluate_and_checkpoint(epoch)
                if loop.stopped_early:
                    return
                continue
            if not end_of_epoch and (
                self.stop_signal is not None or (cfg.save_every and (step + 1) % cfg.save_every == 0)
            ):
                self.save()
                if self.stop_signal is not None:
                    raise self.interrupted()
        self.check_nonfinite(last)

    def log_training(self, epoch: int, t_log: float, bar) -> float:
        rec = train_record(self.totals, self.step, epoch, self.run.names)  # waits for the queued steps
        seconds = time.perf_counter() - t_log
        self.loop.train_seconds += seconds
        self.loop.examples_seen += self.loop.n_log
        if rec["skipped"]:
            log(f"step {self.step}: skipped {rec['skipped']} update(s) with a non-finite loss or gradient")
        self.emit(rec)
        losses = " ".join(f"{t}={rec[t]['loss']:.3f}" for t in self.run.names if rec[t]["loss"] is not None)
        bar.set_postfix_str(f"{losses} {self.loop.n_log / max(seconds, 1e-9):.0f}ex/s")
        self.totals, self.loop.n_log = zero_metrics(self.run.names), 0
        return time.perf_counter()

    def evaluate_and_checkpoint(self, epoch: int, epoch_s: float | None = None) -> None:
        """Validation metrics, the best evaluation so far, early stopping, and a checkpoint (the end of an
        epoch, or every ``--eval-every`` steps; ``epoch_s`` only at the end of an epoch)."""
        run, loop = self.run, self.loop
        val = self.cache["validation"] if self.cache else run.pipeline.splits["validation"]
        with self.clock.part("evaluation"):
            results = evaluate(self.eval_step, self.state.params, run.pipeline, val, run.data.tasks)
        rec = eval_record(results, self.step, epoch, "validation", run.data.tasks)
        score = mean_score(results, run.data.tasks)
        if epoch_s is not None:
            rec["epoch_s"] = round(epoch_s, 3)
        self.emit(rec)
        log(
            (f"epoch {epoch + 1}/{run.epochs}" if epoch_s is not None else f"step {self.step}")
            + " validation: "
            + ", ".join(f"{t.name} {t.describe(results[t.name])}" for t in run.data.tasks)
        )
        if loop.best_step < 0 or score > loop.best_score:
            loop.best_score, loop.best_epoch, loop.best_step = score, epoch, self.step
            loop.since_best = 0
            self.best_params = to_host(self.state.params)
        else:
            loop.since_best += 1
        if run.cfg.patience and loop.since_best >= run.cfg.patience and self.step < run.total_steps:
            loop.stopped_early = True
            log(
                f"step {self.step}: no better mean validation score in {loop.since_best} evaluations "
                f"(--patience {run.cfg.patience}); stopping, the best was step {loop.best_step}"
            )
        # a --max-steps stop mid-epoch keeps its place, so a longer --resume continues this epoch
        if loop.position == run.steps_per_epoch:
            loop.epoch, loop.position = epoch + 1, 0
        self.save(score=score)
        if self.stop_signal is not None:
            raise self.interrupted()

    def fit(self) -> None:
        """Every remaining epoch; SIGINT / SIGTERM save a checkpoint and stop with 130 / 143."""
        run = self.run

        def on_signal(signum, _frame):
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=run.total_steps,
            initial=self.step,
            disable=not (run.cfg.progress and is_primary()),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            for epoch in range(self.loop.epoch, run.epochs):
                if self.step >= run.total_steps or self.loop.stopped_early:  # resuming a run that already finished
                    break
                if epoch != self.loop.epoch:
                    self.loop.epoch, self.loop.position, self.loop.n_log = epoch, 0, 0
                t_epoch = time.perf_counter()
                with self.clock.part("train"):
                    self.train_epoch(epoch, bar)
                if self.loop.stopped_early:
                    break
                self.evaluate_and_checkpoint(epoch, time.perf_counter() - t_epoch)
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def interrupted(self) -> Interrupted:
        self.ckpts.close()
        self.close_metrics()
        name = signal.Signals(self.stop_signal).name
        return Interrupted(
            f"{name} at step {self.step}: checkpoint saved; resume with: python scripts/train.py "
            f"--out {self.run.out} --resume (plus the same options)",
            128 + self.stop_signal,
        )

    # ---- the end

    def best(self):
        """The best epoch's parameters (from its checkpoint when that epoch was trained before a resume),
        placed as the training state is, so the test evaluation reuses the validation's programs."""
        if self.best_params is not None:  # the host copy
            return place_state(self.best_params, self.run.mesh, self.run.cfg.fsdp)
        step = self.loop.best_step  # restored into the checkpoint target, which is placed as the state
        tree, _ = self.ckpts.restore(step, self.checkpoint_target(self.ckpts.restore_meta(step)))
        return tree["state"].params

    def finish(self) -> dict:
        """Test the best parameters; write summary.json, the export, plots and report.md."""
        run, loop = self.run, self.loop
        with self.clock.part("evaluation"):
            best = self.best()
            self.ckpts.close()
            summary = {
                "best_epoch": loop.best_epoch + 1,
                "best_step": loop.best_step,
                "steps": self.step,
                "stopped_early": loop.stopped_early,
            }
            for split in ("validation", "test"):
                data = run.pipeline.splits[split]
                summary[split] = evaluate(self.eval_step, best, run.pipeline, data, run.data.tasks)
        self.emit(eval_record(summary["test"], self.step, loop.best_epoch, "test", run.data.tasks))
        self.close_metrics()
        summary |= {
            "examples_per_s": loop.examples_seen / max(loop.train_seconds, 1e-9),
            "train_seconds": loop.train_seconds,
            "backend": jax.default_backend(),
            "truncated": {s: run.pipeline.splits[s].truncated for s in SPLITS},
            "parameters": group_sizes(run.params),
        }
        if "loss_weights" in best:  # learned (uncertainty): the effective weight exp(-s) per task
            summary["loss_weights"] = {t: float(np.exp(-np.asarray(s))) for t, s in best["loss_weights"].items()}
        if is_primary():
            with self.clock.part("export"):
                write_outputs(run, summary, best, self.records)
        seconds = self.clock.breakdown()
        summary |= {
            "wall_s": seconds["wall"],
            "seconds": seconds,
            "compiled_programs": self.clock.programs,
            "programs_from_cache": self.clock.cache_hits,
            "compiled_shapes": {k: sorted(v) for k, v in self.shapes.items() if v},
        }
        self.clock.close()
        if is_primary():
            write_summary(run, summary)
            log(
                f"best epoch {summary['best_epoch']}; test: "
                + ", ".join(f"{t.name} {t.describe(summary['test'][t.name])}" for t in run.data.tasks)
                + f"; {summary['wall_s']:.0f}s; outputs in {run.out}"
            )
        return summary


def train_and_evaluate(cfg: TrainConfig) -> dict:
    """Train on ``cfg``'s tasks, keep the best evaluation by the mean of the tasks' primary scores, test it, export it."""
    clock = RunClock()
    with clock.part("setup"):
        run = setup(cfg)
        _write_run_start(run)
        trainer = Trainer(run, Checkpoints(run.out / "checkpoints", keep=cfg.keep), clock)
        if cfg.resume:
            trainer.restore()
        trainer.state = place_state(trainer.state, run.mesh, cfg.fsdp)
        trainer.open_metrics()
    trainer.describe(trainer.loop.phase)
    log(f"optimizer state: {count_numbers(trainer.state.opt_state):,} numbers")
    trainer.fit()
    return trainer.finish()
