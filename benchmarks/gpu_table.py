#!/usr/bin/env python
"""The tables of benchmarks/gpu.sh from its JSON lines, each figure beside its goal: our step against
the PyTorch peer in the same run (ratios of median steps), compile seconds and MFU, the default
training's wall time by part, encode() against sentence-transformers, the task types' steps against
classification's, and what was skipped or failed."""

from __future__ import annotations

import json
import sys

STEP_GOALS = {  # (batch is the larger one?, frozen) -> (peer implementation, goal ratio)
    (True, False): ("torch-compile-bf16", 1.2),
    (False, False): ("torch-eager-bf16", 2.5),
    (True, True): ("torch-eager-bf16", 1.5),
}


def rows_of(path: str) -> list[dict]:
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a script's own progress line
    return rows


def mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def rate(r: dict) -> str:
    """Model TFLOP/s, and the MFU where the chip's peak is known."""
    return f"{r['model_tflops_per_s']} TFLOP/s" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else "")


def steps(rows: list[dict]) -> None:
    ours = [r for r in rows if r.get("benchmark") == "train_step"]
    peer = {(r["impl"], r["batch"], r["freeze_backbone"]): r for r in rows if "impl" in r}
    if not ours:
        return
    big = max(r["batch"] for r in ours)
    print("| our step | ex/s | compile s (goal <= 15) | model FLOP/s | peer | peer ex/s | ratio | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ours:
        frozen = r["freeze"] == "backbone"
        impl, goal = STEP_GOALS.get((r["batch"] == big, frozen), ("-", None))
        p = peer.get((impl, r["batch"], frozen))
        ratio = r["examples_per_s"] / p["examples_per_s"] if p else None
        label = f"{r['dtype']} {r['batch']} x {r['seq']}, {r['pooling']}, freeze {r['freeze']}"
        if r.get("xla_flags"):
            label += f", XLA_FLAGS={r['xla_flags'].strip()}"
        verdict = (
            f">= {goal}x: {mark(ratio >= goal)}" if ratio and goal and r["freeze"] in ("none", "backbone") else "-"
        )
        print(
            f"| {label} | {r['examples_per_s']:,.0f} | {r['compile_s']} ({mark(r['compile_s'] <= 15)}) | "
            f"{rate(r)} | {impl if p else '-'} | "
            f"{p['examples_per_s'] if p else '-'} | {f'{ratio:.2f}x' if ratio else '-'} | {verdict} |"
        )
    for r in peer.values():
        print(f"peer {r['impl']} batch {r['batch']} frozen={r['freeze_backbone']}: {r['examples_per_s']} ex/s")


def options(rows: list[dict]) -> None:
    for r in (r for r in rows if r.get("benchmark") == "compile_options"):
        print(
            f"\nstep {r['dtype']} {r['batch']} x {r['seq']}, {r['pooling']}: set up in {r['setup_s']} s, traced "
            f"and lowered in {r['trace_and_lower_s']} s; compiled under each XLA option set, in this order:"
        )
        print("| options | compile s (goal <= 15) | ex/s | step vs the first | model FLOP/s |")
        print("|---|---|---|---|---|")
        for name, s in r["sets"].items():
            vs = next(v for k, v in s.items() if k.startswith("step_vs_"))
            print(
                f"| {name} {s['options'] or ''} | {s['compile_s']} ({mark(s['compile_s'] <= 15)}) | "
                f"{s['examples_per_s']:,.0f} | {vs} | {rate(s)} |"
            )


def gradcache(rows: list[dict]) -> None:
    for r in (r for r in rows if r.get("benchmark") == "gradcache"):
        steps = r["steps"]
        print(
            f"\ngradient caching, {r['size']} {r['dtype']}, seq {r['seq']}: temporary MiB "
            + ", ".join(f"{k} {v['temp_mib']} ({v['rows']} rows, {v['chunks']} chunks)" for k, v in steps.items())
        )
        print(
            f"  cached memory vs one chunk {r['cached_temp_vs_small']}x (goal <= 1.3: "
            f"{mark(r['cached_temp_vs_small'] <= 1.3)}); cached speed vs uncached at 16x "
            f"{r['cached_speed_vs_whole']}x (goal >= 0.5: {mark(r['cached_speed_vs_whole'] >= 0.5)})"
        )


def training(rows: list[dict]) -> None:
    goals = {"empty": 90, "warm": 45}
    for r in (r for r in rows if "run" in r):
        wall = r["seconds"]["wall"]
        goal = f" (goal <= {goals[r['run']]} s: {mark(wall <= goals[r['run']])})" if r["run"] in goals else ""
        print(f"\ntraining run {r['run']}: wall {wall} s{goal}; by part {r['seconds']}")
        print(f"  {r['examples_per_s']} ex/s; test primary metrics {r['test']}; compiled shapes {r['shapes']}")


def encoding(rows: list[dict]) -> None:
    ours = {r["dtype"]: r for r in rows if r.get("benchmark") == "encode"}
    st = {r["dtype"]: r for r in rows if r.get("benchmark") == "st_encode"}
    for dtype, r in ours.items():
        ref = st.get(dtype)
        ratio = r["sentences_per_s"] / ref["sentences_per_s"] if ref else None
        vs = (
            f"; sentence-transformers {ref['sentences_per_s']}: {ratio:.2f}x (goal >= 3x: {mark(ratio >= 3)})"
            if ref
            else ""
        )
        cosine = f", min cosine to float32 {r['min_cosine_vs_float32']}" if "min_cosine_vs_float32" in r else ""
        print(f"\nencode() {dtype}: {r['sentences_per_s']} sentences/s, {rate(r)}{cosine}{vs}")


def types(rows: list[dict]) -> None:
    for r in (r for r in rows if r.get("benchmark") == "task_types"):
        ratios = ", ".join(f"{k} {v['vs_classification']}x" for k, v in r["types"].items())
        print(
            f"\ntask types' steps ({r['batch']} rows x {r['seq']}, {r['per_row']} a row), time against classification: {ratios}"
        )


def main(path: str) -> None:
    rows = rows_of(path)
    steps(rows)
    options(rows)
    gradcache(rows)
    training(rows)
    encoding(rows)
    types(rows)
    print()
    for r in (r for r in rows if "item" in r):
        state = (
            "skipped (time)"
            if r.get("skipped")
            else f"{r['seconds']} s" + (f", FAILED rc {r['rc']}" if r["rc"] else "")
        )
        print(f"{r['item']}: {state}")


if __name__ == "__main__":
    main(sys.argv[1])
