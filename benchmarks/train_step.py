#!/usr/bin/env python
"""Throughput of the jit-compiled multi-task train step on random tokens.

Prints one JSON line: examples_per_s, step_s (median of --steps after --warmup),
compile_s, trainable parameters and optimizer-state size. Shapes match the PyTorch
peer (benchmarks/torch_mtl_step.py): --size minilm is dim 384 x 6 layers,
--size base is distilbert-base (768 x 6), --size tiny is 32 x 2.

With --grad-diagnostics K it also times K steps with and without one task-gradient
probe (as the trainer runs it every K steps) and reports the overhead as a ratio.
"""

# ruff: noqa: E402  (the host-memory tuning comes before JAX's first computation)
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

from mtl_jax.training.hostmem import reuse_host_memory

# as the command-line programs do, before JAX's first computation (--default-malloc: the A/B switch)
HOST_MEMORY_REUSED = "--default-malloc" not in sys.argv and reuse_host_memory()

import jax
import jax.numpy as jnp
import numpy as np
from transformers import DistilBertConfig

from mtl_jax.config import TrainConfig
from mtl_jax.data.batching import TokenBatch, single_rows
from mtl_jax.data.packing import MAX_SEGMENTS
from mtl_jax.model.flops import model_flops_utilization, train_step_flops
from mtl_jax.model.lora import TARGETS, LoRA, with_lora
from mtl_jax.model.multitask import MultiTaskModel, compute_dtype
from mtl_jax.tasks import TaskConfig, build
from mtl_jax.training.freezing import encoder_frozen, frozen_groups, param_groups
from mtl_jax.training.optim import OptimConfig, count_numbers
from mtl_jax.training.steps import TrainState, build_train_step, frozen_param_mask, make_grad_probe
from mtl_jax.training.weighting import REGISTRY, make

SIZES = {
    "tiny": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "minilm": dict(dim=384, n_layers=6, n_heads=12, hidden_dim=1536),
    "base": dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=list(SIZES), default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64, help="tokens per row")
    p.add_argument(
        "--per-row",
        type=int,
        default=1,
        metavar="K",
        help="sentences packed into each row (seq / K tokens each), as the trainer packs them; "
        "examples per step = batch * K",
    )
    p.add_argument("--freeze", default="none", help="none | backbone | all | head:<task> | top:<k> | lora")
    p.add_argument(
        "--lora-rank", type=int, default=16, help="with --freeze lora: adapters of this rank on q,k,v,out,ffn"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--pooling",
        choices=["cls", "mean", "max"],
        default="mean",
        help="the trainer's default is mean; the PyTorch peer pools cls",
    )
    p.add_argument(
        "--attention", choices=["auto", "fused", "xla"], default="auto", help="see mtl_jax.model.encoder.Attention"
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1, help="encoder dropout and attention dropout")
    p.add_argument(
        "--grad-diagnostics", type=int, default=0, metavar="K", help="also time the probe's overhead at every K steps"
    )
    p.add_argument(
        "--peak-tflops", type=float, help="chip peak for the MFU figure (default: known GPUs' bf16 dense peak)"
    )
    p.add_argument(
        "--loss-weighting",
        nargs="+",
        choices=list(REGISTRY),
        metavar="M",
        help="time these loss-weighting methods against sum in one run, rounds interleaved: step time and "
        "the compiled step's temporary memory, as ratios (famo and the gradient methods run the batch "
        "as two task sub-batches of half its rows, as the trainer does)",
    )
    p.add_argument(
        "--compile-options",
        nargs="+",
        choices=list(OPTION_SETS),
        metavar="SET",
        help="compile the step once under each of these XLA option sets (OPTION_SETS: default, cublas = no "
        "Triton GEMMs, autotune0 = no autotuning), in this order, in one process; then time each program, "
        "rounds interleaved: what each set costs in compile seconds and buys in step time",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc and JAX's CPU dispatch as they are (no mtl_jax.training.hostmem.reuse_host_memory)",
    )
    p.add_argument(
        "--task-type",
        nargs="+",
        choices=list(TYPE_SETTINGS),
        metavar="T",
        help="time one task of each of these types against a classification task on the same packed tokens, "
        "rounds interleaved (--per-row sentences per row, 2 at least: a pair's two sentences share a row)",
    )
    args = p.parse_args()
    host_memory_reused = HOST_MEMORY_REUSED

    config = DistilBertConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        dropout=args.dropout,
        attention_dropout=args.dropout,
        **SIZES[args.size],
    )
    if args.task_type:
        print(json.dumps(compare_task_types(args, config)))
        return
    if args.freeze == "lora":
        config = with_lora(config, LoRA(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=TARGETS))
    model = MultiTaskModel(
        config,
        pooling=args.pooling,
        dtype=compute_dtype(args.dtype),
        attention=args.attention,
    )
    rng = np.random.default_rng(0)
    batch = jax.tree.map(jnp.asarray, random_batch(rng, args.batch, args.seq, args.per_row))
    examples = args.batch * args.per_row
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch.ids[:1], batch.segments[:1])["params"]
    groups = set(jax.tree.leaves(param_groups(params)))
    frozen = frozen_groups(args.freeze, groups)
    # built as the trainer builds it (a fully frozen encoder runs without dropout)
    if args.loss_weighting:
        print(json.dumps(compare_weighting(args, model, params, frozen, batch)))
        return
    tx, step = build_train_step(
        model, params, frozen, OptimConfig.from_config(TrainConfig(), 10_000), tasks=heads(model)
    )
    no_encoder_dropout = encoder_frozen(frozen, groups)
    state = TrainState.create(params, tx.init(params))
    key = jax.random.PRNGKey(1)
    slots = MAX_SEGMENTS if args.per_row > 1 else 1
    flops = train_step_flops(config, args.batch, args.seq, groups - frozen, args.pooling, slots)
    if args.compile_options:
        print(json.dumps(compare_compile_options(args, step, state, batch, key, flops)))
        return

    t0 = time.perf_counter()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = step(state, batch, key)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, key)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    mfu = model_flops_utilization(flops, step_s, args.peak_tflops)
    if args.grad_diagnostics:
        mfu |= probe_overhead(model, state, step, batch, key, args.grad_diagnostics)
    trainable = sum(
        int(np.prod(x.shape))
        for x, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen_param_mask(params, frozen)))
        if not f
    )
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "backend": jax.default_backend(),
                "device": str(jax.devices()[0].device_kind),
                "size": args.size,
                "batch": args.batch,
                "seq": args.seq,
                "per_row": args.per_row,
                "freeze": args.freeze,
                "dtype": args.dtype,
                "pooling": args.pooling,
                "attention": args.attention,
                "encoder_dropout": 0.0 if no_encoder_dropout else args.dropout,
                "host_memory_reused": host_memory_reused,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "examples_per_s": round(examples / step_s, 2),
                "step_s": round(step_s, 4),
                "step_s_min": round(min(times), 4),
                "compile_s": round(compile_s, 2),
                "trainable_params": trainable,
                "optimizer_state_numbers": count_numbers(state.opt_state),
                "loss": float(m.totals.loss),
            }
            | mfu
        )
    )


def random_batch(rng: np.random.Generator, rows: int, seq: int, per_row: int) -> TokenBatch:
    """A packed batch of random tokens: ``per_row`` sentences of ``seq // per_row`` tokens in each of ``rows`` rows
    (one sentence per row: a padded batch without padding, as the PyTorch peer runs it)."""
    n = rows * per_row
    labels = np.stack([rng.integers(0, 3, n), rng.integers(0, 2, n)], 1).astype(np.int32)
    ids = rng.integers(1000, 30000, (rows, seq)).astype(np.int32)
    if per_row == 1:
        return single_rows(ids, np.ones_like(ids), {"task_a": labels[:, 0], "task_b": labels[:, 1]})
    each = seq // per_row
    token = np.arange(seq)
    segments = np.broadcast_to(np.where(token < each * per_row, token // each + 1, 0), ids.shape).astype(np.int32)
    slots = np.full((rows, MAX_SEGMENTS, 2), -1, np.int32)
    slots[:, :per_row] = labels.reshape(rows, per_row, 2)
    positions = np.broadcast_to(token % each, ids.shape).astype(np.int32)
    return TokenBatch(ids, positions, segments, {"task_a": slots[..., 0], "task_b": slots[..., 1]})


def task_stacked(batch: TokenBatch) -> TokenBatch:
    """The batch as two task sub-batches of half its rows each (arrays ``[rows / 2, 2, ...]``)."""
    half = len(batch.ids) // 2
    return jax.tree.map(lambda v: jnp.stack([v[:half], v[half : 2 * half]], axis=1), batch)


def compare_weighting(args, model, params, frozen, batch) -> dict:
    """Median step time and compiled temporary memory of each method against ``sum``, in one process."""
    key = jax.random.PRNGKey(1)
    methods = ["sum"] + [m for m in dict.fromkeys(args.loss_weighting) if m != "sum"]
    runs = {}
    for m in methods:
        weighting = make(m)
        params = weighting.add_params(params, [t for t, _ in model.tasks])
        optim = OptimConfig.from_config(TrainConfig(), 10_000)
        tx, step = build_train_step(model, params, frozen, optim, weighting, tasks=heads(model))
        b = task_stacked(batch) if weighting.every_task else batch
        state = TrainState.create(jax.tree.map(jnp.array, params), tx.init(params), weighting.init(2))
        t0 = time.perf_counter()
        memory = step.lower(state, b, key).compile().memory_analysis()
        runs[m] = {"state": state, "step": step, "batch": b, "times": [], "compile_s": time.perf_counter() - t0}
        runs[m]["temp_bytes"] = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else None
    interleaved(runs, args.warmup + args.steps, key)
    base = runs["sum"]
    base_s = float(np.median(base["times"][args.warmup :]))
    result = {}
    for m, r in runs.items():
        step_s = float(np.median(r["times"][args.warmup :]))
        result[m] = {
            "step_s": round(step_s, 4),
            "vs_sum": round(step_s / base_s, 3),
            "compile_s": round(r["compile_s"], 2),
            "temp_mib": None if r["temp_bytes"] is None else round(r["temp_bytes"] / 2**20, 1),
        }
        if r["temp_bytes"] and base["temp_bytes"]:
            result[m]["temp_vs_sum"] = round(r["temp_bytes"] / base["temp_bytes"], 3)
    return {
        "benchmark": "loss_weighting",
        "backend": jax.default_backend(),
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "freeze": args.freeze,
        "dtype": args.dtype,
        "steps": args.steps,
        "methods": result,
    }


# XLA option sets for --compile-options (GPU options: a CPU run takes only "default")
OPTION_SETS = {
    "default": {},
    "cublas": {"xla_gpu_enable_triton_gemm": False},  # GEMMs by cuBLAS: no Triton GEMM tiles to autotune
    "autotune0": {"xla_gpu_autotune_level": 0},  # no autotuning at all: the first kernel that fits
}


def compare_compile_options(args, step, state, batch, key, flops: float) -> dict:
    """Compile seconds and step time of the step under each of ``args.compile_options``, in one process.

    XLA keeps the autotuning results of a process: a set compiled after another that autotuned the
    same kernels would reuse them, so pass the sets that autotune least first.
    """
    setup_s = time.perf_counter() - T_START
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, key)
    lower_s = time.perf_counter() - t0
    runs = {}
    for name in dict.fromkeys(args.compile_options):
        t0 = time.perf_counter()
        program = lowered.compile(compiler_options=OPTION_SETS[name] or None)
        compile_s = time.perf_counter() - t0
        runs[name] = {"state": jax.tree.map(jnp.copy, state), "step": program, "batch": batch, "times": []}
        runs[name]["compile_s"] = compile_s
    interleaved(runs, args.warmup + args.steps, key)
    first = next(iter(runs))
    base_s = float(np.median(runs[first]["times"][args.warmup :]))
    sets = {}
    for name, r in runs.items():
        step_s = float(np.median(r["times"][args.warmup :]))
        sets[name] = {
            "options": OPTION_SETS[name],
            "compile_s": round(r["compile_s"], 2),
            "step_s": round(step_s, 4),
            "examples_per_s": round(args.batch * args.per_row / step_s, 1),
            f"step_vs_{first}": round(step_s / base_s, 3),
        } | model_flops_utilization(flops, step_s, args.peak_tflops)
    return {
        "benchmark": "compile_options",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "freeze": args.freeze,
        "dtype": args.dtype,
        "pooling": args.pooling,
        "setup_s": round(setup_s, 2),
        "trace_and_lower_s": round(lower_s, 2),
        "sets": sets,
    }


def interleaved(runs: dict, rounds: int, key) -> None:
    """Each run's step once per round (``runs[name]``: state, step, batch, times), times appended."""
    for _ in range(rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], out = r["step"](r["state"], r["batch"], key)
            jax.block_until_ready(out)
            r["times"].append(time.perf_counter() - t0)


TYPE_SETTINGS = {  # a task of each type, its labels as the trainer would resolve them
    "classification": dict(labels=("a", "b", "c")),
    "pair_classification": dict(labels=("a", "b", "c"), text_columns=("x", "y")),
    "similarity": dict(text_columns=("x", "y"), score_range=(0.0, 5.0)),
    "retrieval": dict(text_columns=("x", "y")),
    "tagging": dict(labels=("B-X", "I-X", "O")),
    "multilabel": dict(labels=("a", "b", "c", "d")),
    "regression": dict(),
    # retrieval with guided negatives: the model as its own guide, or the starting encoder (a second pass)
    "retrieval_guide_self": dict(type="retrieval", text_columns=("x", "y"), guide="self"),
    "retrieval_guide_initial": dict(type="retrieval", text_columns=("x", "y"), guide="initial"),
}


def type_batch(task, batch: TokenBatch, rng: np.random.Generator) -> TokenBatch:
    """``batch``'s tokens with one task's labels: one per example (a pair: its first of two slots) or per token."""
    rows, seq = batch.ids.shape
    used = np.zeros((rows, MAX_SEGMENTS), bool)
    used[:, : int(batch.segments.max())] = True
    if task.segments > 1:
        used[:, 1::2] = False  # an example's second sentence: no label of its own
    if task.token_level:
        y = np.where(batch.segments > 0, rng.integers(0, task.outputs, (rows, seq)), -1).astype(np.int32)
    elif task.label_dtype == np.float32:
        y = np.where(used, rng.uniform(0, 5, used.shape), np.nan).astype(np.float32)
    elif task.label_shape:
        y = np.where(used[..., None], rng.integers(0, 2, used.shape + task.label_shape), -1).astype(np.int8)
    else:
        y = np.where(used, rng.integers(0, max(task.outputs, 1), used.shape), -1).astype(np.int32)
    return batch.replace(labels={task.name: jnp.asarray(y)})


def heads(model: MultiTaskModel) -> tuple:
    """The classification tasks of the model's ``(name, classes)`` heads."""
    return tuple(build(TaskConfig(name, ""), tuple(map(str, range(n)))) for name, n in model.tasks)


def compare_task_types(args, config) -> dict:
    """Median step time of each task type's packed step against classification's, same tokens, one process."""

    key = jax.random.PRNGKey(1)
    rng = np.random.default_rng(0)
    tokens = jax.tree.map(jnp.asarray, random_batch(rng, args.batch, args.seq, max(args.per_row, 2)))
    runs = {}
    for kind in ["classification"] + [t for t in dict.fromkeys(args.task_type) if t != "classification"]:
        settings = dict(TYPE_SETTINGS[kind])
        task = build(TaskConfig("t", "", type=settings.pop("type", kind), **settings))
        task = task if task.labels else task.with_labels([])  # numbers from no data: the types' defaults
        model = MultiTaskModel(config, tasks=(task.head_spec(),), pooling=args.pooling)
        b = type_batch(task, tokens, rng)
        params = jax.jit(model.init)(jax.random.PRNGKey(0), b.ids[:1], b.segments[:1])["params"]
        if model.guided:  # the starting encoder's copy, as init_params keeps it
            params["guide"] = jax.tree.map(jnp.copy, params["encoder"])
        optim = OptimConfig.from_config(TrainConfig(), 10_000)
        frozen = frozen_groups("none", set(jax.tree.leaves(param_groups(params))))
        tx, step = build_train_step(model, params, frozen, optim, tasks=(task,))
        runs[kind] = {"state": TrainState.create(params, tx.init(params)), "step": step, "batch": b, "times": []}
    interleaved(runs, args.warmup + args.steps, key)
    base_s = float(np.median(runs["classification"]["times"][args.warmup :]))
    result = {}
    for kind, r in runs.items():
        step_s = float(np.median(r["times"][args.warmup :]))
        result[kind] = {"step_s": round(step_s, 4), "vs_classification": round(step_s / base_s, 3)}
    return {"benchmark": "task_types", "backend": jax.default_backend(), "size": args.size, "batch": args.batch,
            "seq": args.seq, "per_row": max(args.per_row, 2), "pooling": args.pooling, "steps": args.steps,
            "types": result}  # fmt: skip


def probe_overhead(model, state, step, batch, key, k: int) -> dict:
    """Seconds for k steps without and with one task-gradient probe (half the batch per task), and their ratio."""
    stacked = task_stacked(batch)
    probe = make_grad_probe(model, heads(model))
    jax.block_until_ready(probe(state.params, stacked))  # compile
    out = {}
    for name, with_probe in (("plain", False), ("diagnostics", True), ("plain_again", False)):
        t0 = time.perf_counter()
        for i in range(k):
            if with_probe and i == 0:
                jax.block_until_ready(probe(state.params, stacked))  # the trainer reads it at once
            state, m = step(state, batch, key)
        jax.block_until_ready(m)
        out[f"{name}_{k}_steps_s"] = round(time.perf_counter() - t0, 3)
    plain = min(out[f"plain_{k}_steps_s"], out[f"plain_again_{k}_steps_s"])
    out["diagnostics_overhead"] = round(out[f"diagnostics_{k}_steps_s"] / plain - 1, 4)
    return out


if __name__ == "__main__":
    main()
