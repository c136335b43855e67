"""Loss weighting and task-gradient arithmetic against hand-computed examples."""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.tasks.base import LossSums
from mtl_jax.training.steps import own_task_labels, per_task_grads
from mtl_jax.training.weighting import cosine_matrix, make, mean_losses, pcgrad, uncertainty_terms
from tests.helpers import of_heads


def _per_task(**loss_and_count):
    return {t: LossSums(jnp.float32(s), jnp.int32(0), jnp.int32(c)) for t, (s, c) in loss_and_count.items()}


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


@flax.struct.dataclass
class Features:
    """A batch of feature vectors (the steps' batches are such dataclasses: labels and arrays)."""

    x: jax.Array
    labels: dict


def test_per_task_grads_are_each_tasks_gradient_on_its_own_rows():
    w = {"w": jnp.array([0.3, -0.2])}
    x = jnp.array([[[1.0, 2.0], [0.5, 0.5]], [[-1.0, 1.0], [2.0, 0.0]]])  # [rows=2, T=2, 2]
    # per task [rows, T]: only sub-batch t's labels of task t count there
    labels = {"a": jnp.array([[1, 1], [0, 0]]), "b": jnp.array([[0, 1], [1, 0]])}
    tasks = of_heads((("a", 2), ("b", 2)))

    def loss_fn(params, batch, key):  # a per-task mean of (w.x - label)^2 over the rows labelled for that task
        pred = batch.x @ params["w"]
        per = []
        for name in ("a", "b"):
            y = batch.labels[name]
            per.append(jnp.sum(jnp.where(y >= 0, (pred - y) ** 2, 0.0)) / jnp.maximum(jnp.sum(y >= 0), 1))
        return per[0] + per[1], None

    (losses, _), grads = per_task_grads(loss_fn, w, Features(x, labels), None, tasks)
    for t in range(2):
        own = own_task_labels({k: v[:, t] for k, v in labels.items()}, t, tasks)
        assert all((own[k] == -1).all() for k in ("a", "b")[:t] + ("a", "b")[t + 1 :])
        sub = Features(x[:, t], own)
        want_loss, want_grad = jax.value_and_grad(lambda p: loss_fn(p, sub, None)[0])(w)
        np.testing.assert_allclose(losses[t], want_loss, rtol=1e-6)
        np.testing.assert_allclose(grads["w"][t], want_grad["w"], rtol=1e-6)


# ---- the methods of mtl_jax.training.weighting against NumPy references of the published updates


def _grads(n: int, seed: int, conflict: bool = True) -> np.ndarray:
    g = np.random.default_rng(seed).normal(size=(n, 6))
    if conflict:
        g[1] = -0.7 * g[0] + 0.3 * g[1]  # tasks 0 and 1 pull against each other
    return g


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _adam(x, g, m, v, t, lr, decay=0.0):
    """torch.optim.Adam, L2 ``decay`` added to the gradient (as the authors' code runs it)."""
    g = g + decay * x
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    return x - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8), m, v


@pytest.mark.parametrize("n", [2, 3])
def test_dwa_weights_follow_the_last_two_periods_loss_ratio(n):
    w = make("dwa", temperature=2.0, period=5)
    state, rng = w.init(n), np.random.default_rng(n)
    period_means = []
    for period in range(4):
        steps = [(rng.uniform(0.2, 2.0, n), rng.integers(0, 2, n).astype(np.float32)) for _ in range(5)]
        steps[0][1][:] = 1  # every task seen in every period
        for losses, present in steps:
            weights, loss, state = w.weights(state, jnp.asarray(losses), jnp.asarray(present), None)
            if period < 2:
                want = np.ones(n)
            else:  # w_t = T softmax(r_t / 2), r_t = L_t(e-1) / L_t(e-2), period means over the steps holding t
                want = n * _softmax(period_means[-1] / period_means[-2] / 2.0)
            np.testing.assert_allclose(weights, want, rtol=1e-5)
            np.testing.assert_allclose(float(loss), want @ losses, rtol=1e-5)
        period_means.append(sum(lo * p for lo, p in steps) / sum(p for _, p in steps))


def test_rlw_weights_are_a_softmax_of_normal_draws():
    w = make("rlw")
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = jax.vmap(lambda k: w.weights((), jnp.ones(3), jnp.ones(3), k)[0])(keys)
    want = np.stack([_softmax(np.asarray(jax.random.normal(k, (3,)))) for k in keys[:5]])
    np.testing.assert_allclose(draws[:5], want, rtol=1e-5)
    np.testing.assert_allclose(draws.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(draws.mean(0), [1 / 3] * 3, atol=0.01)  # no task favoured on average
    assert float(draws[:, 0].std()) > 0.1  # and really random from step to step


@pytest.mark.parametrize("n", [2, 3])
def test_famo_matches_numpy(n):
    w = make("famo", lr=0.1, decay=0.01)
    state, rng = w.init(n), np.random.default_rng(n)
    xi, m, v, prev = np.zeros(n), np.zeros(n), np.zeros(n), None
    for t in range(6):
        losses = rng.uniform(0.3, 2.0, n)
        weights, loss, state = w.weights(state, jnp.asarray(losses), jnp.ones(n), None)
        if prev is not None:  # the logits follow the drop of log L since the previous step
            z = _softmax(xi)
            delta = prev - np.log(losses + 1e-8)
            xi, m, v = _adam(xi, z * (delta - z @ delta), m, v, t, 0.1, 0.01)  # softmax's Jacobian^T delta
        prev = np.log(losses + 1e-8)
        z = _softmax(xi)
        c = (z / losses).sum()
        # loss sum_t z_t log L_t / c (c held constant): d loss / d L_t = z_t / (c L_t)
        np.testing.assert_allclose(weights, z / (c * losses), rtol=2e-5)
        np.testing.assert_allclose(float(loss), (z * np.log(losses)).sum() / c, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(state.logits, xi, rtol=1e-4, atol=1e-6)
    assert np.abs(xi).max() > 0.05  # the logits really moved


def _frank_wolfe(g: np.ndarray, iters: int = 20000) -> np.ndarray:
    """Sener & Koltun's min-norm solver: Frank-Wolfe over the simplex, exact line search."""
    gram = g @ g.T
    a = np.full(len(g), 1 / len(g))
    for _ in range(iters):
        t = int(np.argmin(gram @ a))
        v1v1, v1v2, v2v2 = a @ gram @ a, a @ gram[:, t], gram[t, t]
        gamma = np.clip((v2v2 - v1v2) / max(v1v1 + v2v2 - 2 * v1v2, 1e-20), 0.0, 1.0)
        a = gamma * a
        a[t] += 1 - gamma
    return a


def _combine(method, g: np.ndarray, heads: np.ndarray, **kw):
    """``make(method).combine`` on a tree with an encoder leaf ``g`` [T, 6] and a heads leaf [T, 2]."""
    w = make(method, **kw)
    tree = {"encoder": {"w": jnp.asarray(g, jnp.float32)}, "heads": {"b": jnp.asarray(heads, jnp.float32)}}
    losses = jnp.linspace(1.0, 2.0, len(g))
    return w.combine(w.init(len(g)), losses, tree, tree["encoder"], jax.random.PRNGKey(0))


@pytest.mark.parametrize("n,conflict", [(2, True), (2, False), (3, True), (3, False)])
def test_mgda_is_the_min_norm_point_of_the_task_gradients(n, conflict):
    g = _grads(n, seed=n, conflict=conflict)
    heads = np.random.default_rng(9).normal(size=(n, 2))
    grads, coef, _, _ = _combine("mgda", g, heads)
    if n == 2:  # closed form: a_0 = (g1 - g0) . g1 / |g0 - g1|^2, clipped to [0, 1]
        a0 = np.clip((g[1] - g[0]) @ g[1] / ((g[0] - g[1]) @ (g[0] - g[1])), 0, 1)
        want = np.array([a0, 1 - a0])
    else:
        want = _frank_wolfe(g)
    d = want @ g
    np.testing.assert_allclose(grads["encoder"]["w"], d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
    np.testing.assert_allclose(coef.sum(), 1.0, rtol=1e-5)
    # optimality: no task gradient has a smaller projection on d than |d|^2 (else moving towards it shortens d)
    assert (g @ np.asarray(grads["encoder"]["w"])).min() >= d @ d * (1 - 1e-3) - 1e-6
    np.testing.assert_allclose(grads["heads"]["b"], heads.sum(0), rtol=1e-6)  # heads: own task's gradient


@pytest.mark.parametrize("n,conflict", [(2, True), (2, False), (3, True), (3, False)])
def test_cagrad_matches_the_authors_solver(n, conflict):
    from scipy.optimize import minimize

    g = _grads(n, seed=10 + n, conflict=conflict)
    c = 0.5
    grads, coef, _, _ = _combine("cagrad", g, np.zeros((n, 2)), c=c)
    # the authors' code: w = argmin_{simplex} w.A.b + c |g0| sqrt(w.A.w), b uniform, A the Gram matrix
    # (scaled to mean diagonal 1 for SLSQP's absolute tolerance; the minimiser does not change)
    a = g @ g.T / np.trace(g @ g.T) * n
    b = np.full(n, 1 / n)
    k = c * np.sqrt(a.mean() + 1e-8)
    res = minimize(
        lambda x: x @ a @ b + k * np.sqrt(x @ a @ x + 1e-8),
        b,
        method="SLSQP",
        bounds=[(0, 1)] * n,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    gw = res.x @ g
    g0 = g.mean(0)
    want = (g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw) * gw) / (1 + c * c)  # rescale 1
    np.testing.assert_allclose(grads["encoder"]["w"], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(coef @ g, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # CAGrad's guarantee: the worst task's improvement is no less than under the mean gradient g0
    d = np.asarray(grads["encoder"]["w"]) * (1 + c * c)
    assert (g @ d).min() >= (g @ g0).min() - 1e-6


@pytest.mark.parametrize("n", [2, 3])
def test_gradnorm_matches_numpy(n):
    alpha, lr = 1.5, 0.1
    w = make("gradnorm", alpha=alpha, lr=lr)
    state = w.init(n)
    rng = np.random.default_rng(n)
    ws, m, v, initial = np.ones(n), np.zeros(n), np.zeros(n), None
    base = rng.normal(size=(n, 6)) * np.arange(1, n + 1)[:, None]  # task t's gradient ~ (t + 1) x as long
    for t in range(1, 7):
        g, heads = base + 0.1 * rng.normal(size=(n, 6)), rng.normal(size=(n, 2))
        losses = np.array([1.5, 1.0, 0.8][:n]) * (1 - 0.05 * t * np.arange(n))  # task 0 trains slowest
        tree = {"encoder": {"w": jnp.asarray(g, jnp.float32)}, "heads": {"b": jnp.asarray(heads, jnp.float32)}}
        grads, coef, loss, state = w.combine(state, jnp.asarray(losses, jnp.float32), tree, tree["encoder"], None)
        # this step's update: sum_t w_t g_t over the whole tree with the weights before their own update
        np.testing.assert_allclose(coef, ws, rtol=1e-5)
        np.testing.assert_allclose(grads["encoder"]["w"], ws @ g, rtol=1e-5, atol=1e-5 * np.abs(g).max())
        np.testing.assert_allclose(grads["heads"]["b"], ws @ heads, rtol=1e-5, atol=1e-5 * np.abs(heads).max())
        np.testing.assert_allclose(float(loss), ws @ losses, rtol=1e-5)
        # Chen et al.: G_t = w_t |g_t|, target mean(G) r_t^alpha held constant, d/dw_t sum |G - target|
        initial = losses if initial is None else initial
        norms = np.linalg.norm(g, axis=1)
        ratio = losses / initial
        target = (ws * norms).mean() * (ratio / ratio.mean()) ** alpha
        ws, m, v = _adam(ws, np.sign(ws * norms - target) * norms, m, v, t, lr)
        ws = n * np.maximum(ws, 0) / np.maximum(ws, 0).sum()
        np.testing.assert_allclose(state.w, ws, rtol=1e-5)
    assert ws[0] > 1.1 and ws[-1] < 0.9  # weight moved to the slow task with the short gradient


def test_methods_keep_their_state_when_the_encoder_is_frozen():
    for method in ("gradnorm", "mgda", "cagrad", "pcgrad"):
        w = make(method)
        tree = {"encoder": {"w": jnp.zeros((2, 3))}, "heads": {"b": jnp.asarray([[1.0, 0.0], [0.0, 2.0]])}}
        grads, _, _, state = w.combine(w.init(2), jnp.ones(2), tree, None, jax.random.PRNGKey(0))
        np.testing.assert_allclose(grads["heads"]["b"], [1.0, 2.0])
        chex.assert_trees_all_equal(state, w.init(2))


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown loss weighting 'gradnrom'; choose from sum, static"):
        make("gradnrom")


def test_pcgrad_program_does_not_grow_with_the_number_of_tasks():
    """T x T projections unrolled made nine tasks' step take minutes to compile; as loops the
    program is the same size for two tasks and nine (and over a tree of many leaves)."""
    tree = lambda n: {f"l{i}": jnp.ones((n, 3)) for i in range(20)}  # noqa: E731
    size = lambda n, key=None: len(jax.make_jaxpr(pcgrad)(tree(n), key).eqns)  # noqa: E731
    assert size(9) == size(2)
    assert size(9, jax.random.PRNGKey(0)) == size(2, jax.random.PRNGKey(0))  # the random orders too
