"""benchmarks/gpu_table.py: the GPU run's lines come back as a table with each goal's verdict,
whatever was skipped or failed (the GPU call is rare: its table must not break); and the CPU
benchmarks still run against the library as it is."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import gpu_table
from tests.helpers import ROOT


def test_gpu_table_puts_each_figure_beside_its_goal(tmp_path, capsys):
    ours = dict(
        benchmark="train_step", dtype="bfloat16", seq=128, pooling="mean", xla_flags="", model_tflops_per_s=300.0
    )
    rows = [
        ours | dict(batch=256, freeze="none", examples_per_s=12000.0, compile_s=12.0, mfu=0.31),
        ours | dict(batch=32, freeze="none", examples_per_s=5000.0, compile_s=20.0),
        {"impl": "torch-compile-bf16", "batch": 256, "freeze_backbone": False, "examples_per_s": 9000.0},
        {"impl": "torch-eager-bf16", "batch": 32, "freeze_backbone": False, "examples_per_s": 2500.0},
        {"run": "empty", "seconds": {"wall": 95.0}, "examples_per_s": 3000.0, "test": {}, "shapes": {}},
        {"benchmark": "encode", "dtype": "bfloat16", "sentences_per_s": 40000.0, "model_tflops_per_s": 200.0},
        {"benchmark": "st_encode", "dtype": "bfloat16", "sentences_per_s": 10000.0},
        {"item": "types run", "skipped": True, "left_s": 12},
        {"item": "st float32", "seconds": 3, "rc": 1},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("a progress line\n" + "".join(json.dumps(r) + "\n" for r in rows))
    gpu_table.main(str(path))
    out = capsys.readouterr().out
    assert "| 1.33x | >= 1.2x: yes |" in out  # 12,000 against torch.compile's 9,000
    assert "| 2.00x | >= 2.5x: **no** |" in out and "20.0 (**no**)" in out and "MFU 31.0%" in out
    assert "wall 95.0 s (goal <= 90 s: **no**)" in out
    assert "4.00x (goal >= 3x: yes)" in out
    assert "types run: skipped (time)" in out and "st float32: 3 s, FAILED rc 1" in out


@pytest.mark.slow  # each compiles a step: make test-slow
@pytest.mark.parametrize(
    "args",
    [
        ["benchmarks/train_step.py", "--size", "tiny", "--steps", "2", "--warmup", "1", "--grad-diagnostics", "2"],
        ["benchmarks/train_step.py", "--size", "tiny", "--steps", "2", "--warmup", "1", "--loss-weighting", "famo"],
        ["benchmarks/train_step.py", "--size", "tiny", "--steps", "2", "--warmup", "1", "--task-type", "retrieval"],
        ["benchmarks/input_wait.py", "--steps", "6", "--rounds", "1"],
    ],
)
def test_benchmarks_run_and_print_json(args):
    """The benchmarks drive the library's own steps and loop: a change there must not leave them broken."""
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))
