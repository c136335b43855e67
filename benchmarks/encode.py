#!/usr/bin/env python
"""Throughput of SentenceEncoder.encode on the embedded Rotten Tomatoes snippets.

Prints one JSON line: sentences/s after one warm-up pass, and the model FLOP/s of the packed
calls encode() ran (``mtl_jax.model.flops.embed_flops``; MFU on known chips). benchmarks/cpu_vs_peer.sh
and benchmarks/gpu.sh run it beside sentence-transformers (benchmarks/st_encode.py) on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from mtl_jax import load_encoder  # noqa: E402
from mtl_jax.config import DEFAULT_TASKS  # noqa: E402
from mtl_jax.data.load import read_rows, resolve_path  # noqa: E402
from mtl_jax.data.packing import MAX_SEGMENTS, packed_calls  # noqa: E402
from mtl_jax.model.flops import embed_flops, model_flops_utilization  # noqa: E402


def rotten_tomatoes_texts() -> list[str]:
    task = DEFAULT_TASKS[1]
    rows = read_rows(resolve_path(task.train), [task.text_column, task.label_column])
    return [r.fields["text"] for r in rows if r.fields.get("category") in ("fresh", "rotten")]


def encode_flops(enc, texts: list[str], batch_size: int) -> float:
    """The matrix FLOPs of encode()'s packed calls over ``texts`` (the same packing, counted per call)."""
    ids, _ = enc.tokenizer(texts, enc.spec.max_length)
    return sum(
        embed_flops(enc.config, *call.ids.shape, enc.spec.pooling, MAX_SEGMENTS)
        for call in packed_calls(ids, batch_size, enc.tokenizer.pad_id)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--limit", type=int, help="take the first N snippets (default: all 12,808)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    texts = rotten_tomatoes_texts()[: args.limit]
    enc = load_encoder(dtype=args.dtype)
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=args.batch_size, progress=False)  # first pass: compiles every bucket it meets
    first_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = enc.encode(texts, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    out = {
        "benchmark": "encode",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "dtype": args.dtype,
        "sentences": len(texts),
        "batch_size": args.batch_size,
        "seconds": round(seconds, 3),
        "sentences_per_s": round(len(texts) / seconds, 1),
        "first_pass_s": round(first_seconds, 3),
        "embedding_dim": int(emb.shape[1]),
        "compiled_shapes": enc._embed_fn._cache_size(),
    }
    if args.dtype != "float32":  # the reduced-precision path (cuDNN's fused attention on a GPU) against float32
        sample = texts[:512]
        ref = load_encoder().encode(sample, batch_size=args.batch_size, progress=False)
        out["min_cosine_vs_float32"] = round(float((ref * emb[: len(sample)]).sum(1).min()), 5)
    print(json.dumps(out | model_flops_utilization(encode_flops(enc, texts, args.batch_size), seconds)))


if __name__ == "__main__":
    main()
