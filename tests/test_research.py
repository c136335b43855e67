"""The research toolkit in whole runs (tiny encoder): cached embeddings, loss weighting, gradient diagnostics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from mtl_jax.config import TrainConfig, load_config_file
from mtl_jax.training.trainer import train_and_evaluate


def _run(tiny_bert, tiny_data, out, **options) -> tuple[dict, list[dict]]:
    values = load_config_file(tiny_data / "tasks.yaml") | dict(
        encoder=str(tiny_bert), out=str(out), batch_size=8, progress=False, log_every=4
    )
    summary = train_and_evaluate(TrainConfig(**(values | options)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_cached_embeddings_train_the_same_heads_as_the_full_forward(tmp_path, tiny_bert, tiny_data, capsys):
    opts = dict(freeze="backbone", epochs=3, head_lr=0.05)
    cached, rec_cached = _run(tiny_bert, tiny_data, tmp_path / "cached", **opts)
    assert "cached the embeddings of 153 examples" in capsys.readouterr().err
    full, rec_full = _run(tiny_bert, tiny_data, tmp_path / "full", cache_embeddings=False, **opts)
    assert "cached the embeddings" not in capsys.readouterr().err
    a = load_file(tmp_path / "cached" / "export" / "heads.safetensors")
    b = load_file(tmp_path / "full" / "export" / "heads.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    # the heads did train: they moved from their initialisation (the run's seed 0, as init_params draws it)
    import jax
    import jax.numpy as jnp

    from mtl_jax.model.heads import Features
    from mtl_jax.model.multitask import Heads

    zeros = jnp.zeros((1, 1, 32))
    init = Heads((("topic", 3), ("sentiment", 2))).init(
        jax.random.fold_in(jax.random.PRNGKey(0), 1), Features(zeros, zeros, None)
    )
    for task in ("topic", "sentiment"):
        assert np.abs(a[f"{task}.kernel"] - np.asarray(init["params"][task]["kernel"])).max() > 1e-2
    for split in ("validation", "test"):
        for t in ("topic", "sentiment"):
            assert cached[split][t]["confusion"] == full[split][t]["confusion"]
    val = [r for r in rec_cached if r["split"] == "validation"]
    assert len(val) == 3 and all(r["epoch_s"] > 0 for r in val)
    # (a sentence's embedding depends on its row neighbours by float rounding only)
    np.testing.assert_allclose(
        [r["loss"] for r in rec_cached if r["split"] == "train"],
        [r["loss"] for r in rec_full if r["split"] == "train"],
        rtol=1e-6,
    )


def test_a_frozen_phase_shorter_than_an_epoch_is_not_cached(tmp_path, tiny_bert, tiny_data, capsys):
    _run(tiny_bert, tiny_data, tmp_path / "run", freeze="backbone,none@step:5", epochs=1)
    err = capsys.readouterr().err
    assert "cached the embeddings" not in err and "phase 1 (none)" in err


@pytest.mark.slow  # whole runs, twice or more: make test-slow
def test_pcgrad_with_gradient_diagnostics(tmp_path, tiny_bert, tiny_data):
    out = tmp_path / "pcgrad"
    summary, records = _run(
        tiny_bert, tiny_data, out, loss_weighting="pcgrad", grad_diagnostics=2, epochs=1, freeze="none", lr=1e-3
    )
    grads = [r for r in records if r["split"] == "gradients"]
    steps = summary["steps"]
    assert [r["step"] for r in grads] == list(range(0, steps, 2))
    for r in grads:
        assert -1.0 <= r["cosine"]["topic|sentiment"] <= 1.0
        assert r["topic"]["grad_norm"] > 0 and r["sentiment"]["grad_norm"] > 0
        assert np.isclose(r["loss"], r["topic"]["loss"] + r["sentiment"]["loss"])
    assert (out / "gradients.png").stat().st_size > 0
    train = [r for r in records if r["split"] == "train"]
    # every PCGrad step holds both tasks: each log interval of 4 steps saw 4 x 4 examples of each
    assert all(r["topic"]["examples"] == r["sentiment"]["examples"] for r in train)
    assert train[0]["topic"]["examples"] == 16
    assert summary["test"]["topic"]["examples"] == 9


def test_uncertainty_weights_are_learned_and_reported(tmp_path, tiny_bert, tiny_data):
    summary, _ = _run(
        tiny_bert, tiny_data, tmp_path / "unc", loss_weighting="uncertainty", epochs=3, freeze="backbone", head_lr=0.05
    )
    w = summary["loss_weights"]
    assert set(w) == {"topic", "sentiment"}
    # from 1.0 each: the hard task (topic, train loss ~1.0) is weighted down, the easy one
    # (sentiment, ~0.13) up, as exp(-s) heads for 1 / loss
    assert w["topic"] < 0.7 and w["sentiment"] > 1.05, w


def test_dwa_weights_follow_the_epoch_losses_in_a_run(tmp_path, tiny_bert, tiny_data):
    summary, records = _run(
        tiny_bert,
        tiny_data,
        tmp_path / "dwa",
        loss_weighting="dwa",
        epochs=3,
        freeze="backbone",
        head_lr=0.05,
        grad_accum=2,  # (cached embeddings in micro-batches)
    )
    train = [r for r in records if r["split"] == "train"]
    by_epoch = {
        e: [(r["topic"]["weight"], r["sentiment"]["weight"]) for r in train if r["epoch"] == e] for e in range(3)
    }
    assert all(w == (1.0, 1.0) for e in (0, 1) for w in by_epoch[e])  # weight 1 until two epochs have finished
    # then T softmax(r / 2) of the last two epochs' loss ratios: constant through the epoch, summing to T = 2
    assert len(set(by_epoch[2])) == 1
    ((topic, sentiment),) = set(by_epoch[2])
    assert topic + sentiment == pytest.approx(2.0, abs=1e-5) and abs(topic - 1.0) > 1e-4
    mean = lambda e, t: np.mean([r[t]["loss"] for r in train if r["epoch"] == e and r[t]["loss"] is not None])  # noqa: E731
    # the task whose loss fell less (higher ratio) gets the larger weight
    assert (topic > sentiment) == (mean(1, "topic") / mean(0, "topic") > mean(1, "sentiment") / mean(0, "sentiment"))


def _compare_cfg(tiny_bert, tiny_data, out, **options):
    from mtl_jax.outputs.compare import CompareConfig

    values = load_config_file(tiny_data / "tasks.yaml") | dict(
        encoder=str(tiny_bert), out=str(out), batch_size=8, lr=1e-3, log_every=4
    )
    return CompareConfig(**(values | options))


@pytest.mark.slow  # whole runs, twice or more: make test-slow
def test_compare_writes_the_table_csv_and_plot(tmp_path, tiny_bert, tiny_data):
    import csv

    from mtl_jax.outputs.compare import compare

    out = tmp_path / "cmp"
    rows = compare(_compare_cfg(tiny_bert, tiny_data, out, scenarios=("backbone", "head:topic"), seeds=(0, 1)))
    assert [(r["scenario"], r["seed"]) for r in rows] == [
        ("backbone", 0),
        ("head:topic", 0),
        ("backbone", 1),
        ("head:topic", 1),
    ]
    table = list(csv.DictReader(open(out / "results.csv")))
    assert len(table) == 4 and float(table[0]["topic_test_macro_f1"]) == rows[0]["topic_test_macro_f1"]
    assert list(rows[0]).index("topic_test_macro_f1") < list(rows[0]).index("topic_test_accuracy")  # primary first
    backbone = [r for r in rows if r["scenario"] == "backbone"]
    assert backbone[0]["trainable_params"] == 99 + 66  # the two heads
    md = (out / "results.md").read_text()
    assert "| backbone | sum | 2 |" in md and " ± " in md and "over the frozen-backbone linear probe" in md
    assert (out / "results.png").stat().st_size > 0
    assert not any((out / "runs").glob("*/checkpoints"))


def test_compare_plan_expands_heads_gradual_and_weighting(tiny_bert, tiny_data, tmp_path):
    from mtl_jax.outputs.compare import plan_runs

    cfg = _compare_cfg(
        tiny_bert, tiny_data, tmp_path, scenarios=("none", "head:*", "gradual"), seeds=(3,), weighting=True
    )
    runs = plan_runs(cfg, ["topic", "sentiment"])
    assert [(r["scenario"], r["freeze"], r["weighting"]) for r in runs] == [
        ("none", "none", "sum"),
        ("head:topic", "head:topic", "sum"),
        ("head:sentiment", "head:sentiment", "sum"),
        ("gradual", cfg.gradual, "sum"),
    ] + [("none", "none", m) for m in ("uncertainty", "dwa", "rlw", "famo", "pcgrad", "mgda", "cagrad", "gradnorm")]
    assert all(r["seed"] == 3 for r in runs)


def test_compare_respects_the_time_budget_and_checks_specs_first(tmp_path, tiny_bert, tiny_data, monkeypatch):
    import itertools
    import types

    import pytest

    from mtl_jax import MtlError
    from mtl_jax.outputs.compare import compare

    with pytest.raises(MtlError, match="no task 'nope'"):
        compare(_compare_cfg(tiny_bert, tiny_data, tmp_path / "bad", scenarios=("none", "head:nope")))
    assert not (tmp_path / "bad").exists()
    # compare's clock reads 100 s later at each look, whatever this machine's speed
    clock = itertools.count(0, 100)
    monkeypatch.setattr("mtl_jax.outputs.compare.time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    rows = compare(
        _compare_cfg(
            tiny_bert, tiny_data, tmp_path / "cmp", scenarios=("none", "backbone"), seeds=(0, 1), budget_minutes=2
        )
    )
    assert len(rows) == 1  # 100 s in at the first run, 200 s (past the 120 s budget) at the next
    assert (
        "Not run (time budget): backbone-sum-s0, none-sum-s1, backbone-sum-s1."
        in (tmp_path / "cmp" / "results.md").read_text()
    )


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a folder's TensorBoard event files: {tag: [(step, value), ...]} (TFRecord framing)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    series: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                series.setdefault(v.tag, []).append((event.step, v.simple_value))
    return series


def test_eval_every_patience_tensorboard_and_a_lora_export(tmp_path, tiny_bert, tiny_data):
    # nothing learns (every learning rate 0): each evaluation ties the first, so --patience 2 stops at the third
    from mtl_jax import load

    out = tmp_path / "run"
    summary, records = _run(
        tiny_bert,
        tiny_data,
        out,
        epochs=5,
        eval_every=3,
        patience=2,
        lr=0.0,
        head_lr=0.0,
        lora_lr=0.0,
        freeze="backbone,lora@step:4",
        lora_rank=4,
        grad_accum=4,
    )
    val = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in val] == [3, 6, 9]
    assert summary["stopped_early"] and summary["steps"] == 9 and summary["best_step"] == 3
    assert summary["test"]["topic"]["examples"] == 9  # tested (the best evaluation's parameters) and exported
    # the LoRA phase's adapters are merged into a plain exported model
    assert summary["parameters"]["lora"] == 2 * (4 * 4 * (32 + 32) + 2 * 4 * (32 + 64))
    weights = load_file(out / "export" / "model.safetensors")
    assert not any("lora" in k for k in weights) and len(weights) > 0
    assert load(out / "export").encoder.encode(["a goal story"]).shape == (1, 32)
    # TensorBoard holds the same series as metrics.jsonl
    tb = _tensorboard_scalars(out / "tensorboard")
    for split, key in (("train", "loss"), ("validation", "mean_macro_f1")):
        want = [(r["step"], r[key]) for r in records if r["split"] == split]
        got = tb[f"{split}/{key}"]
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    want = [(r["step"], r["topic"]["accuracy"]) for r in val]
    assert tb["validation/topic/accuracy"] == [(s, pytest.approx(v)) for s, v in want]
    assert "train/sentiment/weight" in tb


def test_a_lora_run_exports_merged_weights_that_give_its_trained_test_loss(tmp_path, tiny_bert, tiny_data):
    """Adapters trained with a non-zero learning rate, merged at export: the plain exported model gives
    the run's own test loss within 1e-5, and its encoder differs from the pretrained one."""
    from mtl_jax import load_encoder
    from tests.helpers import assert_export_reproduces_test_metrics

    out = tmp_path / "run"
    summary, _ = _run(tiny_bert, tiny_data, out, epochs=2, freeze="lora", lora_rank=4, lora_lr=5e-2)
    assert summary["parameters"]["lora"] > 0
    predictor = assert_export_reproduces_test_metrics(out)
    sentences = ["a goal story", "dull mess #3"]
    moved = np.abs(predictor.encode(sentences) - load_encoder(tiny_bert).encode(sentences)).max()
    assert moved > 1e-3  # the merged adapters changed the encoder


def test_eval_limit_validates_on_a_sample_per_task_and_tests_the_best_on_the_full_splits(
    tmp_path, tiny_bert, tiny_data
):
    summary, records = _run(tiny_bert, tiny_data, tmp_path / "run", epochs=2, eval_limit=4, eval_every=5)
    during = [r for r in records if r["split"] == "validation"]
    assert len(during) >= 3 and all(r[t]["examples"] == 4 for r in during for t in ("topic", "sentiment"))
    full = {t: summary["validation"][t]["examples"] for t in ("topic", "sentiment")}
    assert full == {"topic": 9, "sentiment": 8}  # the whole split, for the best model
    again, records_again = _run(tiny_bert, tiny_data, tmp_path / "again", epochs=2, eval_limit=4, eval_every=5)
    assert [r.get("mean_macro_f1") for r in records_again] == [r.get("mean_macro_f1") for r in records]  # seeded
