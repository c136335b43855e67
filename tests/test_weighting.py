"""Loss weighting and task-gradient arithmetic against hand-computed examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.steps import own_task_labels, per_task_grads
from mtl_jax.weighting import cosine_matrix, mean_losses, pcgrad, uncertainty_terms


def _per_task(**loss_and_count):
    return {
        t: {"loss_sum": jnp.float32(s), "count": jnp.int32(c), "correct": jnp.int32(0)}
        for t, (s, c) in loss_and_count.items()
    }


def test_pcgrad_two_conflicting_tasks_by_hand():
    # g1 . g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum (0.5, 1.5)
    grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    np.testing.assert_allclose(pcgrad(grads)["w"], [0.5, 1.5], atol=1e-7)
    # the same split over two leaves of a tree: dot products run over the whole tree
    split = {"x": jnp.array([[1.0], [-1.0]]), "y": jnp.array([[0.0], [1.0]])}
    out = pcgrad(split)
    np.testing.assert_allclose([float(out["x"][0]), float(out["y"][0])], [0.5, 1.5], atol=1e-7)


def test_pcgrad_leaves_agreeing_gradients_alone_and_matches_numpy_for_three_tasks():
    agree = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
    np.testing.assert_allclose(pcgrad(agree)["w"], [2.0, 1.0])

    g = np.random.default_rng(0).normal(size=(3, 5))
    want = np.zeros(5)
    for i in range(3):  # reference: fixed order 0, 1, 2, skipping i
        gi = g[i].copy()
        for j in range(3):
            if j != i and gi @ g[j] < 0:
                gi -= gi @ g[j] / (g[j] @ g[j]) * g[j]
        want += gi
    np.testing.assert_allclose(pcgrad({"w": jnp.asarray(g, jnp.float32)})["w"], want, rtol=1e-5, atol=1e-6)
    # two conflicting tasks by hand (g0 . g1 = -1.5): g0' = g0 + (1.5 / 2.25) g1 = (4/3, 4/3, 2/3) and
    # g1' = g1 + (1.5 / 5) g0 = (-0.4, 0.8, 1), each orthogonal to the gradient it was projected on
    two = {"w": jnp.asarray([[2.0, 1.0, 0.0], [-1.0, 0.5, 1.0]])}
    np.testing.assert_allclose(pcgrad(two)["w"], [4 / 3 - 0.4, 4 / 3 + 0.8, 2 / 3 + 1.0], rtol=1e-6)


def test_uncertainty_terms_by_hand_and_absent_tasks_add_nothing():
    means, present = mean_losses(_per_task(a=(4.0, 2), b=(0.0, 0)), ["a", "b"])  # b: no labels in this batch
    np.testing.assert_allclose(means, [2.0, 0.0])
    s = jnp.asarray([0.5, 1.0])
    terms = uncertainty_terms(means, present, s)
    np.testing.assert_allclose(terms, [np.exp(-0.5) * 2.0 + 0.25, 0.0], rtol=1e-6)
    assert float(jax.grad(lambda s: uncertainty_terms(means, present, s).sum())(s)[1]) == 0.0


def test_uncertainty_weight_settles_where_the_gradient_vanishes():
    # d/ds [exp(-s) L + s/2] = 0  at  s = log(2 L): a noisier (larger-loss) task is weighted down
    means, present = jnp.asarray([3.0, 0.25]), jnp.ones(2)
    grad = jax.grad(lambda s: uncertainty_terms(means, present, s).sum())
    step = jax.jit(lambda s: s - 0.5 * grad(s))
    s = jnp.zeros(2)
    for _ in range(200):
        s = step(s)
    np.testing.assert_allclose(s, [np.log(6.0), np.log(0.5)], atol=1e-4)


def test_cosine_matrix_by_hand():
    grads = {"w": jnp.array([[3.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])}
    norms, cos = cosine_matrix(grads)
    np.testing.assert_allclose(norms, [3.0, np.sqrt(2.0), 2.0], rtol=1e-6)
    np.testing.assert_allclose(cos[0, 1], 1 / np.sqrt(2.0), rtol=1e-6)
    np.testing.assert_allclose(cos[0, 2], -1.0, rtol=1e-6)


def test_per_task_grads_are_each_tasks_gradient_on_its_own_rows():
    w = {"w": jnp.array([0.3, -0.2])}
    x = jnp.array([[[1.0, 2.0], [0.5, 0.5]], [[-1.0, 1.0], [2.0, 0.0]]])  # [rows=2, T=2, 2]
    labels = jnp.array([[[1, 0], [1, 1]], [[0, 1], [0, 0]]])  # [rows, T, T]; only column t counts in sub-batch t

    def loss_fn(params, batch, key):  # a per-task mean of (w.x - label)^2 over the rows labelled for that task
        pred = batch["x"] @ params["w"]
        per = []
        for t in range(2):
            y = batch["labels"][:, t]
            per.append(jnp.sum(jnp.where(y >= 0, (pred - y) ** 2, 0.0)) / jnp.maximum(jnp.sum(y >= 0), 1))
        return per[0] + per[1], None

    (losses, _), grads = per_task_grads(loss_fn, w, {"x": x, "labels": labels}, None)
    for t in range(2):
        sub = {"x": x[:, t], "labels": own_task_labels(labels[:, t], t)}
        want_loss, want_grad = jax.value_and_grad(lambda p: loss_fn(p, sub, None)[0])(w)
        np.testing.assert_allclose(losses[t], want_loss, rtol=1e-6)
        np.testing.assert_allclose(grads["w"][t], want_grad["w"], rtol=1e-6)
