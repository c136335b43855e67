#!/usr/bin/env python
"""The table of benchmarks/gpu.sh from its JSON lines: our step against the PyTorch peer in
the same run (ratios of median steps), and the default training's wall time by part."""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    ours = [r for r in rows if r.get("benchmark") == "train_step"]
    peer = {(r["impl"], r["batch"], r["freeze_backbone"]): r for r in rows if "impl" in r}
    print("| step | ours ex/s | compile s | peer | peer ex/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in ours:
        frozen = r["freeze"] == "backbone"
        impl = "torch-eager-bf16" if frozen or r["batch"] < max(o["batch"] for o in ours) else "torch-compile-bf16"
        p = peer.get((impl, r["batch"], frozen))
        ratio = f"{r['examples_per_s'] / p['examples_per_s']:.2f}x" if p else "-"
        label = f"{r['dtype']} batch {r['batch']} x {r['seq']}, {r['pooling']}" + (", frozen" if frozen else "")
        if r.get("xla_flags"):
            label += f", XLA_FLAGS={r['xla_flags'].strip()}"
        print(
            f"| {label} | {r['examples_per_s']:,.0f} | {r['compile_s']} | {impl} | "
            f"{p['examples_per_s'] if p else '-'} | {ratio} |"
        )
    for r in rows:
        if "impl" in r:
            print(f"peer {r['impl']} batch {r['batch']} frozen={r['freeze_backbone']}: {r['examples_per_s']} ex/s")
        if "run" in r:
            print(f"default training, {r['run']} compile cache: {r['seconds']}; test accuracy {r['test']}")
        if "failed" in r:
            print(f"FAILED: {r['failed']}")


if __name__ == "__main__":
    main(sys.argv[1])
