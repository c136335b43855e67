#!/usr/bin/env python
"""sentence-transformers' encode() on the same texts as benchmarks/encode.py (the reference
to beat). Runs in a venv with torch + sentence-transformers; does not import mtl_jax.
Prints one JSON line with sentences_per_s."""

import argparse
import bz2
import csv
import io
import json
import time

import torch
from sentence_transformers import SentenceTransformer

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--data", required=True, help="rotten_tomatoes_corpus_full.csv.bz2")
p.add_argument("--model", required=True, help="model directory")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--limit", type=int)
p.add_argument("--device", default="cpu", help="cpu | cuda")
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
a = p.parse_args()
rows = csv.DictReader(io.StringIO(bz2.open(a.data, "rb").read().decode("utf-8"), newline=""))
texts = [r["text"] for r in rows if r["category"] in ("fresh", "rotten")][: a.limit]
model = SentenceTransformer(a.model, device=a.device).to(getattr(torch, a.dtype))
model.encode(texts, batch_size=a.batch_size)  # same warm-up as benchmarks/encode.py: one full pass
t0 = time.perf_counter()
model.encode(texts, batch_size=a.batch_size)
seconds = time.perf_counter() - t0
print(
    json.dumps(
        {
            "benchmark": "st_encode",
            "device": a.device,
            "dtype": a.dtype,
            "sentences": len(texts),
            "batch_size": a.batch_size,
            "seconds": round(seconds, 3),
            "sentences_per_s": round(len(texts) / seconds, 1),
        }
    )
)
