#!/usr/bin/env python
"""How long the device waits on the host for each training batch, with the next batch built on a
background thread while a step runs (the default) and built in line after the step, on a tiny
random encoder (2 layers, dim 32: steps are fast, so the host's share shows) over the embedded
tasks. Prints one JSON line per mode and one with their ratio; the two modes alternate over
``--rounds`` runs, and each run's figures are its summary's ``seconds`` (``input``: the wait).

    python benchmarks/input_wait.py --steps 200 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl_jax.training.hostmem import reuse_host_memory  # noqa: E402

reuse_host_memory()  # as the command-line programs do, before JAX's first computation

import numpy as np  # noqa: E402

from mtl_jax.config import TrainConfig  # noqa: E402
from mtl_jax.training import prefetch  # noqa: E402
from mtl_jax.training.trainer import train_and_evaluate  # noqa: E402
from tests.helpers import write_tiny_bert  # noqa: E402  (the tests' tiny random checkpoint)


def run(folder: Path, encoder: Path, steps: int, ahead: bool) -> dict:
    original = prefetch.BatchAhead.ahead
    if not ahead:
        prefetch.BatchAhead.ahead = lambda self, key, build: None  # every batch built when asked for
    try:
        cfg = TrainConfig(encoder=str(encoder), max_steps=steps, freeze="none", out=str(folder), overwrite=True,
                          progress=False, export=False, log_every=50, compile_cache="off")  # fmt: skip
        summary = train_and_evaluate(cfg)
    finally:
        prefetch.BatchAhead.ahead = original
    s = summary["seconds"]
    return {"wait_ms_per_step": 1e3 * s["input"] / steps, "train_ms_per_step": 1e3 * (s["train"] + s["input"]) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="input_wait_"))
    write_tiny_bert(folder / "encoder")
    got: dict[str, list] = {"ahead": [], "in_line": []}
    for r in range(args.rounds):
        for mode in ("in_line", "ahead") if r % 2 else ("ahead", "in_line"):
            got[mode].append(run(folder / f"{mode}-{r}", folder / "encoder", args.steps, mode == "ahead"))
    out = {}
    for mode, runs in got.items():
        out[mode] = {k: round(float(np.median([x[k] for x in runs])), 3) for k in runs[0]}
        print(
            json.dumps(
                {"benchmark": "input_wait", "mode": mode, "steps": args.steps, "rounds": args.rounds} | out[mode]
            )
        )
    ratio = out["ahead"]["wait_ms_per_step"] / max(out["in_line"]["wait_ms_per_step"], 1e-9)
    print(json.dumps({"benchmark": "input_wait", "wait_ahead_vs_in_line": round(ratio, 3)}))


if __name__ == "__main__":
    main()
