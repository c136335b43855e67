"""Checkpoints, exact resume and faults (tiny encoder; the export and predict: test_export.py). Faults happen in
real subprocesses (signals, SIGKILL); the runs around them run in this process (tests.helpers.cli)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mtl_jax import load
from mtl_jax.training.checkpoint import Checkpoints
from mtl_jax.training.trainer import CHECKPOINT_FORMAT
from tests.helpers import ROOT, cli, train_args
from tests.test_cli import ENV

# Runs scripts/train.py in-process after installing a fault (the test's own code, never the library's).
WRAPPER = """
import os, signal, sys, runpy
sys.path.insert(0, {root!r})
fault, at = {fault!r}, {at!r}
import mtl_jax.training.checkpoint as ckpt_mod
calls = {{"batches": 0, "armed": False}}
if fault == "kill-after-save":
    original = ckpt_mod.Checkpoints.save
    def save(self, step, *a, **k):
        original(self, step, *a, **k)
        if step == at:
            calls["armed"] = True
    ckpt_mod.Checkpoints.save = save
if fault in ("kill-after-save", "term-at-batch", "int-at-batch"):
    import mtl_jax.training.trainer as trainer_mod  # steps counted on the loop's thread, as each is queued
    accumulate = trainer_mod.accumulate
    def counting(*a, **k):
        calls["batches"] += 1
        if fault == "kill-after-save" and calls["armed"] and calls["batches"] >= at + 3:
            os.kill(os.getpid(), signal.SIGKILL)  # steps after the checkpoint are lost
        if fault == "term-at-batch" and calls["batches"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        if fault == "int-at-batch" and calls["batches"] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return accumulate(*a, **k)
    trainer_mod.accumulate = counting
if fault == "kill-during-write":  # orbax commits a checkpoint by renaming its temporary folder
    rename = os.rename
    def dying(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == str(at):
            os.kill(os.getpid(), signal.SIGKILL)  # written, never committed
        return rename(src, dst, *a, **k)
    os.rename = dying
if fault in ("kill-at-event", "count-events"):  # events: checkpoint saves, evaluations, the export's steps
    import atexit
    import mtl_jax.outputs.export as export
    import mtl_jax.training.trainer as trainer
    events = [(ckpt_mod.Checkpoints, "save"), (trainer, "evaluate"), (export, "_write_encoder"),
              (export, "_write_sentence_transformers_modules"), (export, "_write_heads"), (export, "verify_export"),
              (export, "_swap_in"), (export, "_exchange")]
    def counted(fn):
        def call(*a, **k):
            calls["batches"] += 1
            if fault == "kill-at-event" and calls["batches"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return call
    for owner, name in events:
        setattr(owner, name, counted(getattr(owner, name)))
    import shutil, types
    export.shutil = types.ModuleType("shutil")  # the export's rmtree: an event once it has removed
    export.shutil.__dict__.update(shutil.__dict__)
    export.shutil.rmtree = lambda *a, **k: (shutil.rmtree(*a, **k), counted(lambda: None)())
    if fault == "count-events":
        atexit.register(lambda: print("EVENTS", calls["batches"], file=sys.stderr))
if fault == "disk-full-at-batch":  # from that step on no file may grow: writes fail as on a full disk
    import resource
    import mtl_jax.training.trainer as trainer_mod
    accumulate = trainer_mod.accumulate
    def filling(*a, **k):
        calls["batches"] += 1
        if calls["batches"] == at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return accumulate(*a, **k)
    trainer_mod.accumulate = filling
sys.argv = ["train.py"] + {args!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def faulty(args: list[str], fault: str, at: int) -> subprocess.CompletedProcess:
    code = WRAPPER.format(root=str(ROOT), fault=fault, at=at, args=args, script=str(ROOT / "scripts" / "train.py"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)


TIMINGS = ("epoch_s",)  # wall-clock seconds: the only values a repeated run may change


def outputs(out: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]
    weights = load_file(str(out / "export" / "model.safetensors")) | load_file(
        str(out / "export" / "heads.safetensors")
    )
    return records, weights


def assert_same_run(a: Path, b: Path) -> None:
    ra, wa = outputs(a)
    rb, wb = outputs(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert ra == rb  # every logged loss and metric, bit for bit
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)  # bit for bit


def test_same_seed_same_run(tmp_path, reference, tiny_bert, tiny_data):
    r = cli("train", *train_args(tiny_bert, tiny_data, tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(reference, tmp_path / "again")


def assert_resume_matches(reference: Path, out: Path, args: list[str], from_step: int) -> None:
    """--resume continues from ``from_step`` and ends exactly where the uninterrupted run did."""
    r = cli("train", *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoints/{from_step} (epoch 1, step {from_step})" in r.stderr
    assert_same_run(reference, out)


@pytest.mark.slow  # a real process killed: make test-slow
def test_sigkill_after_a_save_resumes_from_it_or_from_an_intact_one(tmp_path, reference, tiny_bert, tiny_data):
    out = tmp_path / "run"
    args = train_args(tiny_bert, tiny_data, out)
    r = faulty(args, "kill-after-save", 6)  # SIGKILL two steps after the step-6 checkpoint
    assert r.returncode == -signal.SIGKILL
    assert Checkpoints(out / "checkpoints").steps() == [3, 6]
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    assert_resume_matches(reference, out, args, 6)
    # the newest checkpoint damaged: the run says so and resumes from the one before
    for f in (damaged / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated
    args = train_args(tiny_bert, tiny_data, damaged)
    r = cli("train", *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/6: checkpoint is damaged or unreadable" in r.stderr
    assert "checkpoints/3 (epoch 1, step 3)" in r.stderr
    assert_same_run(reference, damaged)


@pytest.mark.slow  # real processes killed or starved: make test-slow
def test_a_checkpoint_of_another_format_is_refused_and_every_damaged_one_stops_the_run(
    tmp_path, reference, tiny_bert, tiny_data
):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    args = train_args(tiny_bert, tiny_data, out)
    steps = Checkpoints(out / "checkpoints").steps()

    def damage(step):  # (a state this version cannot read fails the same way as a truncated one)
        for f in (out / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file() and f.stat().st_size > 100:
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

    metas = {s: out / "checkpoints" / str(s) / "meta" / "metadata" for s in steps}
    original = {s: f.read_text() for s, f in metas.items()}
    for f in metas.values():  # checkpoints of an older format, the newest of another structure
        f.write_text(json.dumps(json.loads(f.read_text()) | {"format": 3}))
    damage(steps[-1])
    r = cli("train", *args, "--resume")
    assert r.returncode == 2 and f"checkpoint format 3, this version reads {CHECKPOINT_FORMAT}" in r.stderr, r.stderr[
        -2000:
    ]
    assert Checkpoints(out / "checkpoints").steps() == steps  # refused, not moved aside as damaged
    for s, f in metas.items():
        f.write_text(original[s])
    for step in steps:  # every checkpoint damaged
        damage(step)
    r = cli("train", *args, "--resume")
    kept = ", ".join(sorted(f"damaged-{s}" for s in steps))
    assert r.returncode == 2 and f"every checkpoint is damaged (kept as {kept})" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("damaged-")) == sorted(
        f"damaged-{s}" for s in steps
    )
    r = cli("train", *args, "--resume", "--overwrite")  # told to: the run starts again from step 0
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(reference, out)


@pytest.mark.slow  # real processes killed or starved: make test-slow
def test_sigkill_while_writing_leaves_no_checkpoint_and_resumes_from_the_last(
    tmp_path, reference, tiny_bert, tiny_data
):
    out = tmp_path / "run"
    args = train_args(tiny_bert, tiny_data, out)
    r = faulty(args, "kill-during-write", 6)  # SIGKILL before step 6 is committed: never listed
    assert r.returncode == -signal.SIGKILL
    assert Checkpoints(out / "checkpoints").steps() == [3]
    assert_resume_matches(reference, out, args, 3)


@pytest.mark.slow
def test_sigkill_at_seeded_points_of_saves_evaluations_and_export_resumes_to_the_same_run(
    tmp_path, reference, tiny_bert, tiny_data
):
    """A seeded schedule of SIGKILLs across checkpoint saves, evaluations and the export's steps: after
    each, the export that is there loads, and --resume ends exactly as the uninterrupted run."""
    out = tmp_path / "run"
    args = train_args(tiny_bert, tiny_data, out)
    r = faulty([*args, "--overwrite"], "count-events", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    total = int(r.stderr.rsplit("EVENTS ", 1)[1].split()[0])
    schedule = sorted(np.random.default_rng(7).choice(np.arange(1, total + 1), size=5, replace=False).tolist())
    for at in schedule + [total - 1]:  # total - 1: inside the export's swap
        r = faulty([*args, "--overwrite"], "kill-at-event", int(at))
        assert r.returncode == -signal.SIGKILL, (at, r.stderr[-2000:])
        if (out / "export").exists():
            load(out / "export")  # whatever export is there is complete
        r = cli("train", *args, "--resume")
        assert r.returncode == 0, (at, r.stderr[-3000:])
        assert_same_run(reference, out)
        load(out / "export")
    # a finished run's export survives a kill at any event of a longer run's re-export: old or new, it loads
    longer = [*train_args(tiny_bert, tiny_data, out), "--max-steps", "13", "--resume"]
    finished = tmp_path / "finished"
    shutil.copytree(out, finished)
    r = faulty(longer, "count-events", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    total = int(r.stderr.rsplit("EVENTS ", 1)[1].split()[0])
    for at in range(total - 7, total + 1):  # the export's steps, its swap and removal of the old one
        shutil.rmtree(out)
        shutil.copytree(finished, out)
        r = faulty(longer, "kill-at-event", at)
        assert r.returncode == -signal.SIGKILL, (at, r.stderr[-2000:])
        load(out / "export")


@pytest.mark.slow  # real processes killed or starved: make test-slow
def test_a_disk_that_fills_up_mid_run_stops_it_with_the_path_named_and_the_run_resumes(
    tmp_path, reference, tiny_bert, tiny_data
):
    out = tmp_path / "run"
    args = train_args(tiny_bert, tiny_data, out)
    r = faulty(args, "disk-full-at-batch", 5)  # after the step-3 checkpoint
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert str(out) in line and "cannot write" in line, line
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert Checkpoints(out / "checkpoints").steps() == [3]
    r = cli("train", *args, "--resume")  # space again: the newest intact checkpoint resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints/3 (epoch 1, step 3)" in r.stderr
    assert_same_run(reference, out)


@pytest.mark.slow  # real processes killed or starved: make test-slow
def test_sigterm_saves_and_says_how_to_resume(tmp_path, reference, tiny_bert, tiny_data):
    out = tmp_path / "run"
    args = train_args(tiny_bert, tiny_data, out)
    r = faulty(args, "term-at-batch", 8)
    assert r.returncode == 143, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("SIGTERM at step 8: checkpoint saved; resume with: python scripts/train.py --out")
        and "--resume" in last
    )
    assert 8 in Checkpoints(out / "checkpoints").steps()
    assert_resume_matches(reference, out, args, 8)
