"""The command lines as a user runs them: scripts/embed.py and scripts/train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtl_jax import load_encoder
from mtl_jax.training.compile_cache import use_compile_cache
from tests.helpers import ROOT, cli, tiny_train_args

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def run(script: str, *args: str, stdin: str | None = None, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV | env,
        timeout=600,
    )


# ---------------------------------------------------------------------------- embed.py


def test_embed_arguments_stdin_and_npy(tmp_path, tiny_bert):
    want = load_encoder(tiny_bert).encode(["one", "two words", ""])
    r = run("embed.py", "--model", str(tiny_bert), "one", "two words", "")  # the script itself, once
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["one", "two words", ""]
    np.testing.assert_allclose(np.array([row["embedding"] for row in rows]), want, atol=1e-6)
    out = tmp_path / "e.npy"
    r = cli("embed", "--model", str(tiny_bert), "--out", str(out), stdin="one\ntwo words\n\n")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    got = np.load(out)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_embed_into_a_reader_that_stops_early_is_quiet(tiny_bert):
    # `embed.py ... | head -c 100`: the reader closes the pipe after a few bytes
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "embed.py"), "--model", str(tiny_bert), *["word"] * 2000],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=ENV,
    )
    assert proc.stdout.read(100)
    proc.stdout.close()
    stderr = proc.communicate(timeout=600)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_embed_help_lists_options():
    r = cli("embed", "--help")
    assert r.returncode == 0
    for flag in ("--input", "--model", "--out", "--batch-size", "--pooling", "--normalize", "--max-length"):
        assert flag in r.stdout


# ---------------------------------------------------------------------------- train.py


def test_train_end_to_end_writes_every_output(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    r = run(
        "train.py",
        *tiny_train_args(tiny_bert, tiny_data, "--out", str(out), "--epochs", "2", "--log-every", "2"),
        *("--freeze", "backbone,none@epoch:1"),
        JAX_LOG_COMPILES="1",  # JAX names every program it lowers on stderr
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "curves.png",
        "report.md",
        "confusion_topic.png",
        "confusion_sentiment.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    for split in ("validation", "test"):
        for task, labels in (("topic", ["politics", "sports", "tech"]), ("sentiment", ["neg", "pos"])):
            rep = summary[split][task]
            assert set(rep["precision"]) == set(labels) and np.asarray(rep["confusion"]).shape == (len(labels),) * 2
            assert 0 <= rep["accuracy"] <= 1 and 0 <= rep["macro_f1"] <= 1
    assert summary["examples_per_s"] > 0 and summary["wall_s"] > 0
    # the wall time split into its parts (compile seconds taken out of the part they happened in)
    seconds = summary["seconds"]
    assert {"setup", "compile", "train", "input", "evaluation", "checkpoint", "export"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values()) and seconds["compile"] > 0
    assert abs(sum(v for k, v in seconds.items() if k != "wall") - seconds["wall"]) < 0.05
    # packed training batches: at most two step shapes per phase
    shapes = summary["compiled_shapes"]
    trains = [k for k in shapes if k.startswith("train step")]
    assert trains == ["train step, phase 0 (backbone)", "train step, phase 1 (none)"], shapes
    assert all(1 <= len(shapes[k]) <= 2 for k in trains) and 1 <= len(shapes["evaluation"]) <= 4
    # one program per shape: the test evaluation reuses the validation's (the best parameters are
    # placed as the training state is), each phase one per training shape
    assert r.stderr.count("Compiling jit(eval_step)") == len(shapes["evaluation"])
    assert r.stderr.count("Compiling jit(train_step)") == sum(len(shapes[k]) for k in trains)
    n, cached = summary["compiled_programs"], summary["programs_from_cache"]
    assert f"; {n} programs, {cached} of them loaded from the compile cache." in (out / "report.md").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "validation", "test"}
    assert all("step" in r and "loss" in r for r in records)
    assert "phase 1 (none)" in r.stderr  # gradual unfreezing happened
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["labels"] == {"topic": ["politics", "sports", "tech"], "sentiment": ["neg", "pos"]}
    # a second run into the same directory is refused, and changes nothing there
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = cli("train", "--config", str(tiny_data / "tasks.yaml"), "--encoder", str(tiny_bert), "--out", str(out))
    assert r.returncode == 2 and "already holds files" in r.stderr and "--overwrite" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_train_help_lists_every_option():
    r = cli("train", "--help")
    assert r.returncode == 0
    for flag in (
        "--config",
        "--encoder",
        "--freeze",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--seed",
        "--dtype",
        "--log-every",
        "--tasks",
        "--out",
        "--overwrite",
        "--skip-bad-rows",
    ):
        assert flag in r.stdout, flag


@pytest.mark.slow  # whole runs, twice or more: make test-slow
def test_a_second_training_run_loads_every_program_from_the_compile_cache(tmp_path, tiny_bert, tiny_data):
    # Two processes with different string-hash seeds (as any two runs have): the traced programs,
    # and so their cache keys, must not depend on the order of a set (the optimizer's groups).
    def train(out: str, hash_seed: str) -> dict:
        args = tiny_train_args(tiny_bert, tiny_data, "--epochs", "1", "--freeze", "backbone,none@step:3")
        r = run(
            "train.py",
            *args,
            *("--out", str(tmp_path / out), "--compile-cache", str(tmp_path / "xla")),
            PYTHONHASHSEED=hash_seed,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((tmp_path / out / "summary.json").read_text())

    first, second = train("first", "1"), train("second", "2")
    assert first["programs_from_cache"] == 0 and first["compiled_programs"] >= 6
    shapes = first["compiled_shapes"]
    assert {"train step, phase 0 (backbone)", "train step, phase 1 (none)"} <= set(shapes)
    assert second["compiled_shapes"] == shapes
    assert second["programs_from_cache"] == second["compiled_programs"] == first["compiled_programs"]
    # --compile-cache off: not even $JAX_COMPILATION_CACHE_DIR is used
    try:
        assert use_compile_cache("off") is None and not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
