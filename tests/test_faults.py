"""Faults around training (tiny encoder): Ctrl-C across an epoch boundary then an exact resume,
non-finite steps, a failed checkpoint save, an output folder that cannot be made. Split from
test_checkpoint.py so the two halves run on separate test workers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import MtlError
from mtl_jax.training.checkpoint import Checkpoints
from tests.helpers import cli, of_heads, train_args
from tests.test_checkpoint import assert_same_run, faulty, outputs


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "run"
    r = cli(
        "train",
        *train_args(tiny_bert, tiny_data, out),
        "--lr",
        "1e30",
        "--freeze",
        "none",
        "--max-nonfinite",
        "3",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "non-finite for 3 consecutive steps" in r.stderr and "Traceback" not in r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(rec["skipped"] for rec in records) >= 3


def test_non_finite_step_leaves_state_unchanged(tiny_bert):
    from mtl_jax.data.batching import single_rows
    from mtl_jax.inference import load_encoder
    from mtl_jax.model.multitask import MultiTaskModel, init_params
    from mtl_jax.training.steps import TrainState, build_train_step
    from tests.helpers import optim

    enc = load_encoder(tiny_bert)
    model = MultiTaskModel(enc.config, tasks=(("a", 2),))
    params = init_params(model, enc.params, jax.random.PRNGKey(0))
    params["heads"]["a"]["bias"] = jnp.asarray([np.nan, 0.0])
    tx, step = build_train_step(model, params, frozenset(), optim(10), tasks=of_heads(model.tasks))
    state = TrainState.create(jax.tree.map(jnp.array, params), tx.init(params))
    before = jax.tree.map(lambda x: np.asarray(x).tobytes(), (state.params, state.opt_state))
    ids = np.full((2, 8), 2000, np.int32)
    batch = single_rows(ids, np.ones_like(ids), {"a": np.asarray([0, 1], np.int32)})
    for i in range(2):
        state, m = step(state, batch, jax.random.PRNGKey(0))
        assert int(m.totals.skipped) == 1 and int(state.nonfinite) == i + 1
    after = jax.tree.map(lambda x: np.asarray(x).tobytes(), (state.params, state.opt_state))
    assert after == before


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import os

    ckpts = Checkpoints(tmp_path / "ckpt")
    tree = {"w": jnp.arange(4.0)}
    ckpts.save(1, tree, {"epoch": 0})
    rename = os.rename

    def full(src, dst, *a, **k):  # the disk fills up as step 2's files are committed: they are all written
        if os.path.basename(os.fspath(dst)) == "2":
            raise OSError(28, "No space left on device")
        return rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", full)
    with pytest.raises(MtlError, match=r"ckpt/2: could not save checkpoint .*No space left.*step 1 is intact"):
        ckpts.save(2, {"w": jnp.arange(4.0) + 1}, {"epoch": 1})
    monkeypatch.undo()
    assert ckpts.steps() == [1]
    restored, meta = ckpts.restore(1, tree)
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert meta == {"epoch": 0}
    assert Checkpoints(tmp_path / "ckpt").steps() == [1]  # as a resume would list them
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]  # the partial write removed


def test_output_dir_that_cannot_be_created_is_refused_before_training(tmp_path, tiny_bert, tiny_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("train", *train_args(tiny_bert, tiny_data, blocker / "run"))
    assert r.returncode == 2 and ("not a directory" in r.stderr or "not writable" in r.stderr)


# ---------------------------------------------------------------------------- export and predict


@pytest.mark.slow
def test_sigint_across_an_epoch_boundary_then_resume_equals_uninterrupted(tmp_path, tiny_bert, tiny_data):
    """Ctrl-C saves and exits 130; --resume ends where the uninterrupted run ends (crossing from a
    phase whose embeddings are cached into the full forward, with GradNorm's weights, the best epoch read
    back from its checkpoint); a second --resume of the finished run trains nothing; a changed
    fixed option is refused."""
    options = ["--max-steps", "22", "--save-every", "5", "--freeze", "backbone,none@epoch:1"]
    options += ["--loss-weighting", "gradnorm"]
    base = lambda out: train_args(tiny_bert, tiny_data, out) + options  # noqa: E731
    assert cli("train", *base(tmp_path / "ref")).returncode == 0
    total = json.loads((tmp_path / "ref" / "summary.json").read_text())["steps"]
    validation = [r for r in outputs(tmp_path / "ref")[0] if r["split"] == "validation"]
    assert len(validation) == 2, "the run must cross an epoch boundary"
    assert json.loads((tmp_path / "ref" / "summary.json").read_text())["best_epoch"] == 1  # before the Ctrl-C
    out = tmp_path / "run"
    r = faulty(base(out), "int-at-batch", validation[0]["step"] + 2)  # Ctrl-C in the second epoch
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("SIGINT at step")
    r = cli("train", *base(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(tmp_path / "ref", out)
    before = (out / "metrics.jsonl").read_text()
    r = cli("train", *base(out), "--resume")
    assert r.returncode == 0 and "resumed from" in r.stderr and total == 22
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained, the same records
    r = cli("train", *base(out), "--resume", "--lr", "5e-4")
    assert r.returncode == 2 and "--lr" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
