"""Gradient caching (--contrastive-chunk): the step's encoder pass in chunks, re-run in the backward
pass, gives the loss and every gradient of the step without chunks, on a real packed batch of a task
mix (cross-encoded pairs, similarity, retrieval with in-batch negatives, tagging, classification)."""

from __future__ import annotations

import copy

import chex
import jax
import numpy as np
import pytest

from mtl_jax.config import TrainConfig, load_config_file
from mtl_jax.tasks import TaskConfig
from mtl_jax.training import gradcache
from mtl_jax.training.run import setup
from mtl_jax.training.steps import StepSpec, loss_and_grads
from tests.typed_data import write_typed_data


def _run(tmp_path, tiny_bert, method: str, **qa_options):
    values = load_config_file(write_typed_data(tmp_path) / "types.yaml")
    values["task_list"] = tuple(
        TaskConfig(**(t.flat() | qa_options)) if t.name == "qa" else t for t in values["task_list"]
    )
    cfg = TrainConfig(**values, tasks="nli,sts,qa,ner,topic", encoder=str(tiny_bert), batch_size=16,
                      contrastive_chunk=4, loss_weighting=method, out=str(tmp_path / "run"),
                      data_cache=str(tmp_path / "cache"), compile_cache="off", progress=False)  # fmt: skip
    return setup(cfg)


def _grads(run, batch, chunks: int, dropout: bool):
    model = run.model
    if not dropout:
        config = copy.deepcopy(model.config)
        config.dropout = config.attention_dropout = 0.0
        model = model.clone(config=config, head_dropout=0.0)
    spec = StepSpec(model, tuple(run.data.tasks), method=run.weighting, chunks=chunks)
    wstate = run.weighting.init(len(run.names))
    step = jax.jit(lambda p, b, k: loss_and_grads(spec, p, wstate, b, k))
    (loss, per_task, _, _), grads = step(run.params, batch, jax.random.PRNGKey(3))
    return float(loss), per_task, grads


@pytest.mark.parametrize("method", ["sum", pytest.param("pcgrad", marks=pytest.mark.slow)])  # pcgrad: test-slow
def test_chunked_encoder_pass_gives_the_loss_and_every_gradient_of_the_whole_batch(tmp_path, tiny_bert, method):
    """Dropout off: 4 chunks equal 1 (pcgrad: per-task gradients of task sub-batches, each chunked)."""
    run = _run(tmp_path, tiny_bert, method)
    assert run.cfg.chunks == 4 and run.pipeline.chunks == 4
    batch = run.pipeline.train_batch(run.pipeline.plan(0)[0])
    assert batch.rows % 4 == 0  # the grid's rows come in multiples of the chunks
    whole, chunked = _grads(run, batch, 1, False), _grads(run, batch, 4, False)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5)
    chex.assert_trees_all_close(chunked[1], whole[1], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(chunked[2], whole[2], rtol=1e-4, atol=1e-5)
    encoder = jax.tree.leaves(whole[2]["encoder"])
    assert max(float(np.abs(g).max()) for g in encoder) > 1e-3  # the encoder's gradient is there to compare


@pytest.mark.slow  # two runs' setups and five compiles: make test-slow
def test_guide_initial_reads_the_frozen_starting_encoder_in_chunks_too(tmp_path, tiny_bert):
    """guide: initial keeps a copy of the starting encoder (params["guide"], frozen in every
    scenario): at the start it equals guide: self (dropout off), chunked or not, and a trained run
    leaves it bit for bit as it was while the encoder moves."""
    import jax.numpy as jnp

    from mtl_jax.training.steps import TrainState

    (tmp_path / "i").mkdir(), (tmp_path / "s").mkdir()
    guided = _run(tmp_path / "i", tiny_bert, "sum", guide="initial", guide_margin=0.05)
    selfish = _run(tmp_path / "s", tiny_bert, "sum", guide="self", guide_margin=0.05)
    assert "guide" in guided.params and "guide" not in selfish.params
    assert all("guide" in frozen for frozen in guided.frozen_by_phase)
    batch = guided.pipeline.train_batch(guided.pipeline.plan(0)[0])
    first = _grads(selfish, batch, 1, False)
    for chunks in (1, 4):
        loss, per_task, grads = _grads(guided, batch, chunks, False)
        assert loss == pytest.approx(first[0], rel=1e-5)
        chex.assert_trees_all_close(grads["encoder"], first[2]["encoder"], rtol=1e-4, atol=1e-5)
    tx, step = guided_step(guided)
    start = jax.tree.map(np.asarray, guided.params["guide"])
    state = TrainState.create(jax.tree.map(jnp.array, guided.params), tx.init(guided.params))
    for b in guided.pipeline.plan(0)[:3]:
        state, _ = step(state, guided.pipeline.train_batch(b), jax.random.PRNGKey(0))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params["guide"]), start)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params["encoder"], start)
    assert max(jax.tree.leaves(moved)) > 0


def guided_step(run):
    from mtl_jax.training.steps import build_train_step

    frozen = run.frozen_by_phase[-1]
    return build_train_step(run.model, run.params, frozen, run.optim, run.weighting, tasks=run.data.tasks)


def test_each_chunk_is_encoded_again_with_the_same_dropout_in_the_backward_pass(tmp_path, tiny_bert, monkeypatch):
    """Dropout on: the re-run chunks give the gradient of the chunked forward pass kept whole (no
    re-run); a backward pass that drew other masks than the forward pass would differ."""
    run = _run(tmp_path, tiny_bert, "sum")
    batch = run.pipeline.train_batch(run.pipeline.plan(0)[0])
    cached = _grads(run, batch, 4, True)
    monkeypatch.setattr(gradcache.jax, "checkpoint", lambda f, **_: f)  # activations kept: nothing re-run
    kept = _grads(run, batch, 4, True)
    assert cached[0] == pytest.approx(kept[0], rel=1e-6)
    chex.assert_trees_all_close(cached[2], kept[2], rtol=1e-4, atol=1e-6)
    quiet = _grads(run, batch, 4, False)
    assert abs(quiet[0] - cached[0]) > 1e-4  # dropout was on


FOUR_DEVICES = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import jax, numpy as np
from mtl_jax.training.parallel import place_state
from tests.test_gradcache import _grads, _run
run = _run(Path({tmp!r}), {model!r}, "sum")
assert run.mesh.devices.size == 4
run.params = place_state(run.params, run.mesh, fsdp=True)
batch = run.pipeline.train_batch(run.pipeline.plan(0)[0])
assert len(batch.ids.sharding.device_set) == 4
(l1, _, g1), (l4, _, g4) = _grads(run, batch, 1, False), _grads(run, batch, 4, False)
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)))
print(l1, l4, diff)
"""


@pytest.mark.slow  # a process with four forced devices: make test-slow
def test_chunks_over_four_devices_with_fsdp_give_the_unchunked_gradient(tmp_path, tiny_bert):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    code = FOUR_DEVICES.format(root=str(ROOT), tmp=str(tmp_path), model=str(tiny_bert))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    l1, l4, diff = map(float, r.stdout.split())
    assert l4 == pytest.approx(l1, rel=1e-5) and diff <= 1e-5
