"""A run before its first step: the run directory's checks, :func:`setup` (every input checked and
the data, model, input pipeline and freezing phases built before the first byte is written), and
what the run writes and logs as it starts."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from mtl_jax.config import TrainConfig, resume_fixed
from mtl_jax.data.batching import InputPipeline
from mtl_jax.data.load import SPLITS
from mtl_jax.data.store import DataKey, Prepared, changed_files, data_key, prepare
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.errors import MtlError, writing
from mtl_jax.inference import SentenceEncoder, load_encoder
from mtl_jax.model.lora import LoRA, with_lora
from mtl_jax.model.multitask import MultiTaskModel, compute_dtype, init_params
from mtl_jax.tasks.base import has_label
from mtl_jax.training import weighting as loss_weighting
from mtl_jax.training.compile_cache import use_compile_cache
from mtl_jax.training.freezing import (
    Phase,
    encoder_frozen,
    frozen_groups,
    param_groups,
    parse_phases,
    phase_starts,
)
from mtl_jax.training.optim import OptimConfig
from mtl_jax.training.parallel import check_batch_size, initialize_distributed, is_primary, make_mesh, shard_local

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.md", "curves.png", "gradients.png")


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


def run_data_key(cfg: TrainConfig, encoder: SentenceEncoder) -> DataKey:
    """The key of a run's data: its tasks, as the encoder's tokenizer cuts them at the run's max length."""
    max_length = min(cfg.max_length, encoder.spec.max_length)
    return data_key(cfg.selected_tasks(), encoder.tokenizer, max_length, cfg.resolved_split_seed(), cfg.skip_bad_rows)


def check_same_data(out: Path, key: DataKey) -> None:
    """A resumed run reads the data it started with (the same files, unchanged)."""
    saved = json.loads((out / "config.json").read_text())
    if saved.get("data_fingerprint", key.fingerprint) == key.fingerprint:
        return
    changed = changed_files(saved.get("data_files", {}), key.files)
    what = f"{', '.join(changed)} changed" if changed else "the data's settings changed"
    raise MtlError(f"{out}: --resume: {what} since the run started; resume with the data it started with")


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
    data: Prepared
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
    mesh: Mesh  # the devices every step runs on

    @property
    def names(self) -> tuple[str, ...]:
        return self.data.names

    @functools.cached_property
    def validation(self) -> Tokenized:
        """The validation examples evaluated during training (``--eval-limit``: a sample per task)."""
        full = self.pipeline.splits["validation"]
        return full.sample(self.cfg.eval_limit, self.cfg.seed) if self.cfg.eval_limit else full

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @functools.cached_property
    def starts(self) -> list[int]:
        """The step each phase starts at (read on every step)."""
        return phase_starts(self.phases, self.steps_per_epoch)

    def encoder_frozen(self, phase: int) -> bool:
        return encoder_frozen(self.frozen_by_phase[phase], set(jax.tree.leaves(param_groups(self.params))))


def build_model(cfg: TrainConfig, data: Prepared, encoder: SentenceEncoder, phases: list[Phase]) -> MultiTaskModel:
    """The encoder (with LoRA adapters when a phase trains them) and one head per task."""
    lora = LoRA.from_config(cfg.lora_config()) if any(p.spec.strip() == "lora" for p in phases) else None
    return MultiTaskModel(
        with_lora(encoder.config, lora),
        tasks=tuple(t.head_spec() for t in data.tasks),
        pooling=cfg.pooling or encoder.spec.pooling,
        head_dropout=cfg.head_dropout,
        dtype=compute_dtype(cfg.dtype),
        attention=cfg.attention,
        normalize=encoder.spec.normalize,
    )


def build_pipeline(
    cfg: TrainConfig, data: Prepared, encoder: SentenceEncoder, task_stacked: bool, mesh: Mesh
) -> InputPipeline:
    """The tokenized splits and the batching of the run, split over the devices' mesh."""
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh, "--eval-batch-size")
    per_step = cfg.batch_size // len(data.tasks) if task_stacked else cfg.batch_size  # one task's examples in a step
    if task_stacked:  # each task's sub-batch is split over the devices
        check_batch_size(per_step, mesh, f"--batch-size / {len(data.tasks)} tasks")
    for task in data.tasks:
        task.check_batch(per_step)
        task.check_encoder(encoder.dim)
    return InputPipeline(
        data.splits,
        encoder.tokenizer.pad_id,
        data.key.max_length,
        cfg.batch_size,
        cfg.eval_batch_size,
        cfg.seed,
        sampling=cfg.sampling,
        temperature=cfg.temperature,
        task_stacked=task_stacked,
        grad_accum=cfg.grad_accum,
        chunks=cfg.chunks,
        distinct=tuple(t.name for t in data.tasks if t.distinct_in_batch),
        devices=mesh.devices.size,
        place=functools.partial(shard_local, mesh=mesh),
        host=(jax.process_index(), jax.process_count()),
        log=log,
    )


def setup(cfg: TrainConfig) -> Run:
    """Check the options, the run directory, the data and the encoder; build the model and pipeline."""
    initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    use_compile_cache(cfg.compile_cache)
    out = Path(cfg.out)
    check_resumable(out, cfg) if cfg.resume else check_out_dir(out, cfg.overwrite)
    cfg.check()
    tasks = cfg.selected_tasks()
    phases = parse_phases(cfg.freeze)
    encoder = load_encoder(cfg.encoder)
    key = run_data_key(cfg, encoder)
    if cfg.resume:
        check_same_data(out, key)
    data = prepare(tasks, encoder.tokenizer, key, cfg.data_cache, log)
    model = build_model(cfg, data, encoder, phases)
    weighting = cfg.method(tuple(t.weight for t in tasks))
    mesh = make_mesh()
    pipeline = build_pipeline(cfg, data, encoder, weighting.every_task, mesh)
    if cfg.patience and len(pipeline.splits["validation"]) == 0:
        raise MtlError(f"--patience {cfg.patience}: there is no validation data to stop on")
    rng = jax.random.PRNGKey(cfg.seed)
    params = weighting.add_params(init_params(model, encoder.params, jax.random.fold_in(rng, 1)), data.names)
    groups = set(jax.tree.leaves(param_groups(params)))
    steps_per_epoch = len(pipeline.plan(0))
    weighting = weighting.with_epoch_length(steps_per_epoch)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
    pipeline.steps = total_steps  # the grids hold the steps the run takes
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
        [frozen_groups(p.spec, groups) for p in phases],
        steps_per_epoch,
        total_steps,
        OptimConfig.from_config(cfg, total_steps),
        weighting,
        mesh,
    )


def write_run_start(run: Run) -> None:
    """The run directory's config.json, and what the data and devices are, in the log."""
    cfg, pipeline = run.cfg, run.pipeline
    if jax.process_count() > 1:  # no process writes before every process has checked
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mtl_jax: inputs checked")
    if not cfg.resume and is_primary():
        _prepare_out_dir(run.out)
        resolved = {"labels": run.data.labels, "resolved_max_length": pipeline.max_length}
        resolved |= {"data_fingerprint": run.data.key.fingerprint, "data_files": run.data.key.files}
        with writing(run.out / "config.json"):
            (run.out / "config.json").write_text(json.dumps(cfg.to_json() | resolved, indent=2))
    if run.data.folder is not None:
        log(f"data: {run.data.folder} ({'reused' if run.data.reused else 'prepared now'})")
    for note in run.data.notes:
        log(note)
    for s in SPLITS:
        d = pipeline.splits[s]
        per_task = {t: int(has_label(d.labels[t]).sum()) for t in run.names}
        log(f"{s}: {len(d)} examples {per_task}, {d.truncated} truncated at {pipeline.max_length} tokens")
    if cfg.eval_limit:
        log(f"validation during training: {len(run.validation)} examples (--eval-limit {cfg.eval_limit} per task)")
    log(
        f"backend {jax.default_backend()} ({run.mesh.devices.size} device(s), batch split over them); "
        f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps"
    )
    if cfg.chunks > 1:
        log(
            f"gradient caching: each {'micro-' if cfg.grad_accum > 1 else ''}batch's encoder pass in "
            f"{cfg.chunks} chunks (--contrastive-chunk {cfg.contrastive_chunk}), each run again in the backward pass"
        )
