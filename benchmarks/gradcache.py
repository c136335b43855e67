#!/usr/bin/env python
"""Gradient caching (``--contrastive-chunk``): the retrieval train step's temporary memory (XLA's
memory analysis of the compiled step) and its time, with and without chunks, in one process.

Three steps over packed rows of query/passage pairs (two sentences per row, in-batch negatives):
``small``, the step without chunks at ``--rows`` rows (one chunk's worth); ``cached``, the step at
``--factor`` times as many rows in ``--factor`` chunks; ``whole``, the step without chunks at that
large batch. Prints one JSON line: each step's temporary MiB, median step seconds and examples/s,
and the ratios the goals are stated in (cached memory against small; cached speed against whole).

    python benchmarks/gradcache.py --size minilm --rows 16 --seq 64 --factor 16
"""

# ruff: noqa: E402  (the host-memory tuning comes before JAX's first computation)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtl_jax.training.hostmem import reuse_host_memory

reuse_host_memory()  # as the command-line programs do, before JAX's first computation

import jax
import jax.numpy as jnp
import numpy as np
from transformers import DistilBertConfig

from benchmarks.train_step import SIZES, TYPE_SETTINGS, interleaved, random_batch, type_batch
from mtl_jax.config import TrainConfig
from mtl_jax.model.multitask import MultiTaskModel, compute_dtype
from mtl_jax.tasks import TaskConfig, build
from mtl_jax.training.optim import OptimConfig
from mtl_jax.training.steps import TrainState, build_train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="minilm")
    p.add_argument("--rows", type=int, default=16, help="rows of the small step (one chunk)")
    p.add_argument("--seq", type=int, default=64, help="tokens per row (a query and its passage)")
    p.add_argument("--factor", type=int, default=16, help="the large batch is this many chunks")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    config = DistilBertConfig(vocab_size=30522, max_position_embeddings=512, **SIZES[args.size])
    task = build(TaskConfig("qa", "", type="retrieval", **TYPE_SETTINGS["retrieval"])).with_labels([])
    model = MultiTaskModel(config, tasks=(task.head_spec(),), pooling="mean", dtype=compute_dtype(args.dtype))
    rng = np.random.default_rng(0)
    big = type_batch(task, jax.tree.map(jnp.asarray, random_batch(rng, args.rows * args.factor, args.seq, 2)), rng)
    small = jax.tree.map(lambda x: x[: args.rows], big)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), small.ids[:1], small.segments[:1])["params"]
    key = jax.random.PRNGKey(1)
    runs = {}
    for name, batch, chunks in (("small", small, 1), ("cached", big, args.factor), ("whole", big, 1)):
        optim = OptimConfig.from_config(TrainConfig(), 10_000)
        tx, step = build_train_step(model, params, frozenset(), optim, chunks=chunks, tasks=(task,))
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx.init(params))
        t0 = time.perf_counter()
        program = step.lower(state, batch, key).compile()
        memory = program.memory_analysis()
        runs[name] = {"state": state, "step": program, "batch": batch, "times": [], "chunks": chunks}
        runs[name] |= {"compile_s": time.perf_counter() - t0, "temp": memory.temp_size_in_bytes}
    interleaved(runs, args.warmup + args.steps, key)
    out = {}
    for name, r in runs.items():
        step_s = float(np.median(r["times"][args.warmup :]))
        out[name] = {
            "rows": r["batch"].rows,
            "chunks": r["chunks"],
            "temp_mib": round(r["temp"] / 2**20, 1),
            "step_s": round(step_s, 4),
            "pairs_per_s": round(r["batch"].rows / step_s, 1),
            "compile_s": round(r["compile_s"], 2),
        }
    ratios = {
        "cached_temp_vs_small": round(out["cached"]["temp_mib"] / out["small"]["temp_mib"], 3),
        "whole_temp_vs_small": round(out["whole"]["temp_mib"] / out["small"]["temp_mib"], 3),
        "cached_speed_vs_whole": round(out["whole"]["step_s"] / out["cached"]["step_s"], 3),
    }
    print(json.dumps({"benchmark": "gradcache", "backend": jax.default_backend(), "size": args.size,
                      "seq": args.seq, "dtype": args.dtype, "steps": out} | ratios))  # fmt: skip


if __name__ == "__main__":
    main()
