#!/usr/bin/env python
"""Throughput of the jit-compiled multi-task train step on random tokens.

Prints one JSON line: examples_per_s, step_s (median of --steps after --warmup),
compile_s, trainable parameters and optimizer-state size. Shapes match the PyTorch
peer (benchmarks/torch_mtl_step.py): --size minilm is dim 384 x 6 layers,
--size base is distilbert-base (768 x 6), --size tiny is 32 x 2.

With --grad-diagnostics K it also times K steps with and without one task-gradient
probe (as the trainer runs it every K steps) and reports the overhead as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from transformers import DistilBertConfig

from mtl_jax.config import TrainConfig
from mtl_jax.data.batching import TokenBatch, single_rows
from mtl_jax.data.packing import MAX_SEGMENTS
from mtl_jax.model.flops import train_step_flops
from mtl_jax.model.lora import TARGETS, LoRA, with_lora
from mtl_jax.model.multitask import MultiTaskModel
from mtl_jax.training.freezing import encoder_frozen, frozen_groups, layer_index, param_groups
from mtl_jax.training.hostmem import reuse_host_memory
from mtl_jax.training.optim import OptimConfig, count_numbers
from mtl_jax.training.steps import TrainState, build_train_step, frozen_param_mask, make_grad_probe
from mtl_jax.training.weighting import METHODS, make

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
        choices=METHODS,
        metavar="M",
        help="time these loss-weighting methods against sum in one run, rounds interleaved: step time and "
        "the compiled step's temporary memory, as ratios (famo and the gradient methods run the batch "
        "as two task sub-batches of half its rows, as the trainer does)",
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (no mtl_jax.training.hostmem.reuse_host_memory)",
    )
    args = p.parse_args()
    host_memory_reused = False if args.default_malloc else reuse_host_memory()

    config = DistilBertConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        dropout=args.dropout,
        attention_dropout=args.dropout,
        **SIZES[args.size],
    )
    if args.freeze == "lora":
        config = with_lora(config, LoRA(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=TARGETS))
    model = MultiTaskModel(
        config,
        pooling=args.pooling,
        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
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
    tx, step = build_train_step(model, params, frozen, OptimConfig.from_config(TrainConfig(), 10_000))
    no_encoder_dropout = encoder_frozen(frozen, groups)
    state = TrainState.create(params, tx.init(params))
    key = jax.random.PRNGKey(1)

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
    trainable_layers = {layer_index(g) for g in groups - frozen if layer_index(g) is not None}
    flops = train_step_flops(config, args.batch, args.seq, trainable_layers, args.pooling == "cls", len(model.tasks))
    # (LoRA: the backward runs through every layer for the adapters; the FLOP count has no such case)
    mfu = {} if args.freeze == "lora" else model_flops_utilization(flops, step_s, args.peak_tflops)
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
                "loss": float(m["loss"]),
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
        tx, step = build_train_step(model, params, frozen, OptimConfig.from_config(TrainConfig(), 10_000), weighting)
        b = task_stacked(batch) if weighting.every_task else batch
        state = TrainState.create(jax.tree.map(jnp.array, params), tx.init(params), weighting.init(2))
        t0 = time.perf_counter()
        memory = step.lower(state, b, key).compile().memory_analysis()
        runs[m] = {"state": state, "step": step, "batch": b, "times": [], "compile_s": time.perf_counter() - t0}
        runs[m]["temp_bytes"] = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else None
    for _ in range(args.warmup + args.steps):  # rounds: every method once per round
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], out = r["step"](r["state"], r["batch"], key)
            jax.block_until_ready(out)
            r["times"].append(time.perf_counter() - t0)
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


def probe_overhead(model, state, step, batch, key, k: int) -> dict:
    """Seconds for k steps without and with one task-gradient probe (half the batch per task), and their ratio."""
    stacked = task_stacked(batch)
    probe = make_grad_probe(model)
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


# bf16 dense peak (TFLOP/s) by device kind, for the MFU figure
PEAKS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}


def model_flops_utilization(flops: float, step_s: float, peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s of the step's own matrix products (mtl_jax.model.flops) and, on known chips, the MFU."""
    kind = str(jax.devices()[0].device_kind)
    peak = peak_tflops or next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None)
    out = {"step_tflop": round(flops / 1e12, 4), "model_tflops_per_s": round(flops / step_s / 1e12, 3)}
    if peak:
        out["mfu"] = round(flops / step_s / (peak * 1e12), 4)
        out["peak_tflops"] = peak
    return out


if __name__ == "__main__":
    main()
