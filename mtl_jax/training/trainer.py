"""A whole training run: ``train_and_evaluate(cfg)``, what ``scripts/train.py`` calls.

It reads top to bottom: :func:`mtl_jax.training.run.setup` checks every input and builds the
run; :class:`Trainer` holds the train state and the typed :class:`LoopState` (what a checkpoint
saves and restores); :meth:`Trainer.fit` shows, per epoch, the steps, the validation, the best
model, the move to the next epoch and the checkpoint, with hooks (:mod:`mtl_jax.training.hooks`)
for what happens every N steps and writers (:mod:`mtl_jax.outputs.writers`) for where records go;
``finish`` tests the best parameters and writes the summary, export, plots and report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.data.load import SPLITS
from mtl_jax.errors import Interrupted, MtlError
from mtl_jax.outputs.report import eval_record, gradient_record, mean_score, train_record, write_outputs, write_summary
from mtl_jax.outputs.writers import ProgressWriter, Writer, run_writers
from mtl_jax.training.checkpoint import Checkpoints, restore_latest
from mtl_jax.training.compile_cache import RunClock
from mtl_jax.training.evaluation import embed_all, evaluate
from mtl_jax.training.freezing import group_sizes, phase_at, phase_end
from mtl_jax.training.hooks import Best, Hook, SignalStop, StepRecord
from mtl_jax.training.optim import carry_opt_state, count_numbers
from mtl_jax.training.parallel import is_primary, place_state, replicate, to_host
from mtl_jax.training.prefetch import BatchAhead
from mtl_jax.training.run import Run, log, setup, write_run_start
from mtl_jax.training.steps import (
    TrainState,
    accumulate,
    build_train_step,
    make_embed_step,
    make_eval_step,
    make_grad_probe,
    zero_metrics,
)

CHECKPOINT_FORMAT = 6  # 2: named optimizer state, typed loop state; 3: loss-weighting state; 4: its NamedTuple states; 5: typed metric totals; 6: BERT's token-type offsets in the encoder, the grids


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint saves (as JSON) beside the train state, and restores."""

    epoch: int = 0  # the epoch in progress
    position: int = 0  # batches of that epoch's plan consumed
    phase: int = 0  # the freezing phase in force
    records: int = 0  # metrics.jsonl records written
    n_log: int = 0  # training examples since the last training record
    best: Best = field(default_factory=Best)  # the best evaluation so far
    stopped_early: bool = False
    train_seconds: float = 0.0
    examples_seen: int = 0
    grids: dict = field(
        default_factory=dict
    )  # {row length: rows} of the training step shapes (see InputPipeline.grids)
    format: int = CHECKPOINT_FORMAT

    @classmethod
    def from_meta(cls, meta: dict, where: Path) -> LoopState:
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise MtlError(
                f"{where}: checkpoint written by another mtl_jax version (checkpoint format "
                f"{meta.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); it cannot resume it: start the run again"
            )
        return cls(**(meta | {"best": Best.from_dict(meta["best"])}))


@dataclass
class Trainer:
    """The train state and the loop over epochs; hooks for logging, evaluation, checkpoints and signals."""

    run: Run
    ckpts: Checkpoints
    clock: RunClock = field(default_factory=RunClock)
    state: TrainState = None
    loop: LoopState = field(default_factory=LoopState)
    records: list = field(default_factory=list)  # the metrics records written so far
    totals: Any = None  # running metric sums since the last training record (StepTotals, on the device)
    train_step: Callable = None  # the compiled step of the phase in force
    eval_step: Callable = None
    embed_step: Callable = None
    probe: Callable | None = None  # --grad-diagnostics: the task-gradient probe and its fixed batch
    probe_batch: Any = None
    hooks: list[Hook] = field(default_factory=list)
    writers: list[Writer] = field(default_factory=list)
    cache: dict | None = None  # cached embeddings of the phase in ``cache_phase``
    cache_phase: int | None = None
    best_params: Any = None  # host copy of the best evaluation's params, when trained in this process
    signals: SignalStop = field(default_factory=SignalStop)
    ahead: BatchAhead = field(default_factory=BatchAhead)  # the next step's batch, built while a step runs
    step: int = 0  # steps taken: state.step, counted on the host (reading the device's would wait for it)
    saved_step: int = -1  # the step of the newest checkpoint written by this process
    t_log: float = 0.0  # when the examples since the last training record started
    shapes: dict = field(default_factory=dict)  # {compiled function: batch shapes it was called with}

    def __post_init__(self):
        run = self.run
        self.hooks = self.hooks or self.default_hooks()
        self.eval_step = self.noting_shapes(make_eval_step(run.model, run.data.tasks), "evaluation")
        self.embed_step = self.noting_shapes(make_embed_step(run.model), "embedding cache")
        if run.cfg.grad_diagnostics > 0:
            self.probe = self.noting_shapes(make_grad_probe(run.model, run.data.tasks), "gradient probe")
            self.probe_batch = run.pipeline.probe_batch()
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
            run.cfg.chunks,
            tasks=run.data.tasks,
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
        self.loop.grids = self.run.pipeline.grid_rows()
        # (replicated over the mesh: orbax saves only global arrays in a multi-process run)
        tree = {
            "state": self.state,
            "metrics": replicate(self.totals, self.run.mesh),
            "rng": replicate(self.run.rng, self.run.mesh),
        }
        with self.clock.part("checkpoint"):
            self.ckpts.save(self.step, tree, dataclasses.asdict(self.loop), score)
        self.saved_step = self.step

    def save_once(self) -> None:
        """A checkpoint of this step unless one was just saved."""
        if self.saved_step != self.step:
            self.save()

    def restore(self) -> None:
        """Continue from the newest intact checkpoint (and the metrics.jsonl records it had written)."""
        damaged_before = set(self.ckpts.folder.glob("damaged-*"))
        restored = restore_latest(self.ckpts, self.checkpoint_target, LoopState.from_meta, log)
        if restored is None:
            damaged = sorted(p.name for p in set(self.ckpts.folder.glob("damaged-*")) - damaged_before)
            if damaged and not self.run.cfg.overwrite:
                raise MtlError(
                    f"{self.ckpts.folder}: every checkpoint is damaged (kept as {', '.join(damaged)}); "
                    "pass --overwrite with --resume to start the run again from step 0"
                )
            log(f"{self.ckpts.folder}: no intact checkpoint; starting from step 0")
        else:
            tree, meta, ckpt_step = restored
            self.loop = LoopState.from_meta(meta, self.ckpts.folder / str(ckpt_step))
            self.state, self.totals, self.step = tree["state"], tree["metrics"], int(tree["state"].step)
            _, self.train_step = self.build(self.loop.phase)
            self.run.pipeline.restore_grids(self.loop.grids)
            log(f"resumed from {self.ckpts.folder / str(ckpt_step)} (epoch {self.loop.epoch + 1}, step {self.step})")
        path = self.run.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        self.records = [json.loads(line) for line in lines[: self.loop.records]]

    # ---- records

    def open_writers(self) -> None:
        self.writers = run_writers(self.run.out, self.records, is_primary())

    def emit(self, rec: dict) -> None:
        self.records.append(rec)
        for writer in self.writers:
            writer.write(rec)

    def close_writers(self) -> None:
        writers, self.writers = self.writers, []  # (once: an error after a close closes nothing twice)
        for writer in writers:
            writer.close()

    def cached_data(self, step: int) -> dict | None:
        """Train / validation with cached embeddings when the whole encoder stays frozen for an epoch or
        more (and no head reads token states: tagging needs the encoder's every token)."""
        run, phase = self.run, self.loop.phase
        if not (run.cfg.cache_embeddings and run.encoder_frozen(phase)) or run.model.token_heads:
            return None
        if phase_end(run.starts, step, run.total_steps) - step < run.steps_per_epoch:
            return None  # each example would be seen at most once: encoding them all first saves nothing
        todo = {"train": run.pipeline.splits["train"], "validation": run.validation}
        t0 = time.perf_counter()
        with self.examples_bar(sum(len(d) for d in todo.values()), "caching embeddings") as bar:
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
        if metrics is not None and int(metrics.streak) >= self.run.cfg.max_nonfinite:
            raise MtlError(
                f"step {self.step}: loss or gradients non-finite for {int(metrics.streak)} consecutive "
                f"steps (each skipped); stopping without saving. Lower --lr or check the data"
            )

    # ---- hooks

    def default_hooks(self) -> list[Hook]:
        """The loop's cadences from the run's options, in the order they run."""
        cfg = self.run.cfg
        return [
            Hook("gradient probe", cfg.grad_diagnostics, self.probe_gradients, before=True),
            Hook("log", cfg.log_every, self.log_training, at_epoch_end=True),
            Hook("evaluate", cfg.eval_every, self.evaluate_mid_epoch),
            Hook("checkpoint", cfg.save_every, lambda rec: self.save_once()),
            Hook("signal", 1, lambda rec: self.stop_on_signal()),
        ]

    def run_hooks(self, before: bool, step: int, epoch: int, metrics=None, end_of_epoch: bool = False) -> None:
        """The hooks due ahead of (``before``) or after step ``step``, each given the same read-only record."""
        record = None
        for hook in self.hooks:
            if hook.before == before and hook.due(step, end_of_epoch):
                record = record or StepRecord(self.step, epoch, metrics, self.state)
                hook.run(record)
                if self.loop.stopped_early:
                    return

    # ---- one epoch

    def train_epoch(self, epoch: int, bar) -> None:
        """Train from ``loop.position`` to the end of ``epoch``'s plan (or the run's last step), running
        the hooks that are due after each step."""
        run, loop = self.run, self.loop
        plan = run.pipeline.plan(epoch)
        self.t_log, last = time.perf_counter(), None
        for b in range(loop.position, len(plan)):
            if self.step >= run.total_steps:
                break
            step = self.step
            self.enter(step)
            with self.clock.part("input"):  # (the host's wait for the batch: none when built ahead in time)
                batch = self.ahead.get((epoch, b, self.cache_phase), self.batch_builder(plan, b))
            self.run_hooks(True, step, epoch)
            self.state, m = self.train_step(self.state, batch, run.rng)
            if b + 1 < len(plan) and step + 1 < run.total_steps:
                self.ahead.ahead((epoch, b + 1, self.cache_phase), self.batch_builder(plan, b + 1))
            self.totals = accumulate(self.totals, m)
            self.check_nonfinite(last)  # one step behind: the host does not wait for the step just queued
            last, self.step = m, step + 1
            loop.position, loop.n_log = b + 1, loop.n_log + run.pipeline.examples_in(plan[b])
            bar.update(1)
            end_of_epoch = b == len(plan) - 1 or step + 1 == run.total_steps
            self.run_hooks(False, step + 1, epoch, m, end_of_epoch)
            if loop.stopped_early:
                break
        self.ahead.drop()
        if not loop.stopped_early:
            self.check_nonfinite(last)

    def batch_builder(self, plan: list, b: int) -> Callable:
        """Builds batch ``b`` of ``plan`` from the data in force (cached embeddings or tokens)."""
        cache = self.cache["train"] if self.cache else None
        return lambda: self.run.pipeline.train_batch(plan[b], cache)

    def enter(self, step: int) -> None:
        """The freezing phase of ``step`` in force, and its cached embeddings (when it caches them)."""
        if (phase := phase_at(self.run.starts, step)) != self.loop.phase:
            self.enter_phase(phase)
        if self.cache_phase != self.loop.phase:  # (inside the epoch's clock: caching is part of its cost)
            self.cache, self.cache_phase = self.cached_data(step), self.loop.phase

    def probe_gradients(self, rec: StepRecord) -> None:
        out = self.probe(rec.state.params, self.probe_batch)
        self.emit(gradient_record(out, rec.step, rec.epoch, self.run.names))

    def log_training(self, rec: StepRecord) -> None:
        record = train_record(self.totals, rec.step, rec.epoch, self.run.data.tasks)  # waits for the queued steps
        seconds = time.perf_counter() - self.t_log
        self.loop.train_seconds += seconds
        self.loop.examples_seen += self.loop.n_log
        if record["skipped"]:
            log(f"step {rec.step}: skipped {record['skipped']} update(s) with a non-finite loss or gradient")
        self.emit(record)
        self.totals, self.loop.n_log = zero_metrics(self.run.names), 0
        self.t_log = time.perf_counter()

    # ---- evaluation, the best model, checkpoints

    def validate(self, epoch: int, epoch_s: float | None = None) -> float:
        """The validation metrics (a record and a log line); their mean primary score. ``epoch_s``: the
        epoch's seconds, at the end of an epoch."""
        run = self.run
        val = self.cache["validation"] if self.cache else run.validation
        with self.clock.part("evaluation"), self.examples_bar(len(val), "validation") as bar:
            results = evaluate(self.eval_step, self.state.params, run.pipeline, val, run.data.tasks, bar)
        rec = eval_record(results, self.step, epoch, "validation", run.data.tasks)
        if epoch_s is not None:
            rec["epoch_s"] = round(epoch_s, 3)
        self.emit(rec)
        log(
            (f"epoch {epoch + 1}/{run.epochs}" if epoch_s is not None else f"step {self.step}")
            + " validation: "
            + ", ".join(f"{t.name} {t.describe(results[t.name])}" for t in run.data.tasks)
        )
        return mean_score(results, run.data.tasks)

    def keep_if_best(self, score: float, epoch: int) -> None:
        """The best evaluation so far (a host copy of its parameters) and --patience's early stop."""
        run, loop = self.run, self.loop
        if loop.best.consider(score, epoch, self.step):
            self.best_params = to_host(self.state.params)
        if loop.best.exhausted(run.cfg.patience) and self.step < run.total_steps:
            loop.stopped_early = True
            log(
                f"step {self.step}: no better mean validation score in {loop.best.since} evaluations "
                f"(--patience {run.cfg.patience}); stopping, the best was step {loop.best.step}"
            )

    def evaluate_mid_epoch(self, rec: StepRecord) -> None:
        """``--eval-every``: validation, the best model and a checkpoint inside an epoch."""
        score = self.validate(rec.epoch)
        self.keep_if_best(score, rec.epoch)
        self.save(score)

    def fit(self) -> None:
        """Every remaining epoch: its steps, its validation, the best model, the next epoch, a checkpoint.
        SIGINT / SIGTERM save a checkpoint and stop with 130 / 143."""
        run, loop = self.run, self.loop
        with self.signals, self.progress_bar() as bar, contextlib.closing(self.ahead):
            for epoch in range(loop.epoch, run.epochs):
                if self.step >= run.total_steps or loop.stopped_early:  # resuming a run that already finished
                    break
                if epoch != loop.epoch:
                    loop.epoch, loop.position, loop.n_log = epoch, 0, 0
                t_epoch = time.perf_counter()
                with self.clock.part("train"):
                    self.train_epoch(epoch, bar)
                if loop.stopped_early:
                    break
                score = self.validate(epoch, time.perf_counter() - t_epoch)
                self.keep_if_best(score, epoch)
                if loop.position == run.steps_per_epoch:  # (a --max-steps stop mid-epoch keeps its place)
                    loop.epoch, loop.position = epoch + 1, 0
                self.save(score)
                self.stop_on_signal()

    def progress_bar(self) -> tqdm:
        """The steps' progress bar (primary process), fed the training records too."""
        run = self.run
        bar = tqdm(
            total=run.total_steps,
            initial=self.step,
            disable=not (run.cfg.progress and is_primary()),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.writers.append(ProgressWriter(bar, run.names))
        return bar

    def examples_bar(self, total: int, desc: str) -> tqdm:
        """A bar over a split's examples (examples per second, time left), gone when done."""
        show = self.run.cfg.progress and is_primary()
        return tqdm(
            total=total, desc=desc, unit="ex", leave=False, disable=not show, file=sys.stderr, dynamic_ncols=True
        )

    def stop_on_signal(self) -> None:
        """After SIGINT / SIGTERM: a checkpoint of this step, then stop (exit status 128 + the signal)."""
        if self.signals.received is None:
            return
        self.save_once()
        self.ckpts.close()
        self.close_writers()
        raise Interrupted(
            f"{self.signals.name} at step {self.step}: checkpoint saved; resume with: python scripts/train.py "
            f"--out {self.run.out} --resume (plus the same options)",
            128 + self.signals.received,
        )

    # ---- the end

    def best(self):
        """The best epoch's parameters (from its checkpoint when that epoch was trained before a resume),
        placed as the training state is, so the test evaluation reuses the validation's programs."""
        if self.best_params is not None:  # the host copy
            return place_state(self.best_params, self.run.mesh, self.run.cfg.fsdp)
        step = self.loop.best.step  # restored into the checkpoint target, which is placed as the state
        tree, _ = self.ckpts.restore(step, self.checkpoint_target(self.ckpts.restore_meta(step)))
        return tree["state"].params

    def finish(self) -> dict:
        """Test the best parameters; write summary.json, the export, plots and report.md."""
        run, loop = self.run, self.loop
        with self.clock.part("evaluation"):
            best = self.best()
            self.ckpts.close()
            summary = {
                "best_epoch": loop.best.epoch + 1,
                "best_step": loop.best.step,
                "steps": self.step,
                "stopped_early": loop.stopped_early,
            }
            for split in ("validation", "test"):
                data = run.pipeline.splits[split]
                with self.examples_bar(len(data), f"{split} (best)") as bar:
                    summary[split] = evaluate(self.eval_step, best, run.pipeline, data, run.data.tasks, bar)
        self.emit(eval_record(summary["test"], self.step, loop.best.epoch, "test", run.data.tasks))
        self.close_writers()
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


def train_and_evaluate(cfg) -> dict:
    """Train on ``cfg``'s tasks, keep the best evaluation by the mean of the tasks' primary scores, test
    it, export it."""
    clock = RunClock()
    with clock.part("setup"):
        run = setup(cfg)
        write_run_start(run)
        trainer = Trainer(run, Checkpoints(run.out / "checkpoints", keep=cfg.keep), clock)
        if cfg.resume:
            trainer.restore()
        trainer.state = place_state(trainer.state, run.mesh, cfg.fsdp)
        trainer.open_writers()
    trainer.describe(trainer.loop.phase)
    log(f"optimizer state: {count_numbers(trainer.state.opt_state):,} numbers")
    try:
        trainer.fit()
        return trainer.finish()
    except MtlError:  # (a stop on a signal has closed them already)
        trainer.close_writers()
        raise
