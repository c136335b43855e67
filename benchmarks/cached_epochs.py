#!/usr/bin/env python
"""Frozen-backbone training with and without the cached-embedding path, on real data.

Trains the heads on a frozen encoder twice with the same options (default: the
embedded tasks, 2 epochs): once running the encoder on every batch, once on cached
embeddings. Prints one JSON line: per-epoch seconds of both runs, the speed-up of the
cached epochs after the first over the uncached epoch, and the largest difference
between the two runs' test logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl_jax.training.hostmem import reuse_host_memory  # noqa: E402

reuse_host_memory()  # as the command-line programs do, before JAX's first computation

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from mtl_jax.config import TrainConfig, load_config_file  # noqa: E402
from mtl_jax.data.load import load_tasks  # noqa: E402
from mtl_jax.inference import load_encoder  # noqa: E402
from mtl_jax.training.trainer import train_and_evaluate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="tasks file (default: the embedded tasks)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for the two runs (default: a temporary one)")
    args = p.parse_args()
    base = load_config_file(args.config) if args.config else {}
    folder = Path(args.out or tempfile.mkdtemp(prefix="cached_epochs_"))
    runs = {}
    for name, cache in (("uncached", False), ("cached", True)):
        cfg = TrainConfig(
            **(
                base
                | dict(
                    freeze="backbone",
                    epochs=args.epochs,
                    cache_embeddings=cache,
                    out=str(folder / name),
                    overwrite=True,
                    progress=False,
                )
            )
        )
        summary = train_and_evaluate(cfg)
        records = [json.loads(line) for line in (folder / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {
            "cfg": cfg,
            "summary": summary,
            "epoch_s": [r["epoch_s"] for r in records if r["split"] == "validation"],
        }

    cfg = runs["cached"]["cfg"]
    data = load_tasks(cfg.selected_tasks(), seed=cfg.resolved_split_seed())
    texts = data.splits["test"].texts
    pooled = load_encoder(cfg.encoder).encode(
        texts, normalize=False, max_length=min(cfg.max_length, 512), progress=False
    )
    heads = {n: load_file(str(folder / n / "export" / "heads.safetensors")) for n in runs}
    diff = max(
        float(
            np.abs(
                (pooled @ heads["cached"][f"{t}.kernel"] + heads["cached"][f"{t}.bias"])
                - (pooled @ heads["uncached"][f"{t}.kernel"] + heads["uncached"][f"{t}.bias"])
            ).max()
        )
        for t in data.names
    )
    uncached = float(np.mean(runs["uncached"]["epoch_s"]))
    later = runs["cached"]["epoch_s"][1:]
    print(
        json.dumps(
            {
                "benchmark": "cached_epochs",
                "epochs": args.epochs,
                "uncached_epoch_s": [round(s, 3) for s in runs["uncached"]["epoch_s"]],
                "cached_epoch_s": [round(s, 3) for s in runs["cached"]["epoch_s"]],
                "speedup_after_first": round(uncached / float(np.mean(later)), 1) if later else None,
                "max_test_logit_diff": diff,
                "test_accuracy": {
                    n: {t: round(r["summary"]["test"][t]["accuracy"], 4) for t in data.names} for n, r in runs.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
