"""Task types: a type defined in a test file (registered, nothing of the package edited) trains,
evaluates, reports, exports and predicts end to end; the shipped classification type keeps its
numbers; the task registry refuses an unknown type with the task named."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax import MtlError, load
from mtl_jax.config import TaskConfig
from mtl_jax.data import readers
from mtl_jax.data.readers import Row
from mtl_jax.options import FRACTION, POSITIVE, option
from mtl_jax.tasks import REGISTRY, Task, build, register
from mtl_jax.tasks.base import LossSums
from mtl_jax.tasks.metrics import classification_report
from mtl_jax.training import weighting
from tests.helpers import cli, of_heads, tiny_train_args


@dataclasses.dataclass(frozen=True)
class FlagOptions:
    cutoff: float = option(0.5, "predict says yes from this probability on", FRACTION)


@dataclasses.dataclass(frozen=True)
class Flag(Task):
    """A toy type: a yes/no flag scored by one logit (sigmoid cross-entropy), primary metric accuracy;
    an option of its own (``cutoff``)."""

    primary = "accuracy"
    record_keys = ("loss", "accuracy", "examples")
    Options = FlagOptions

    def label_id(self, raw):
        return {"yes": 1, "no": 0}.get(raw.lower(), f"flag {raw!r} is neither yes nor no")

    @property
    def outputs(self):
        return 1

    def loss_sums(self, logits, y):  # logits [R, S, 1], y [R, S]: one per slot
        valid = y >= 0
        z = logits[..., 0].astype(jnp.float32)
        bce = jnp.maximum(z, 0) - z * jnp.maximum(y, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))
        return LossSums(jnp.sum(jnp.where(valid, bce, 0.0)), jnp.sum(valid & ((z > 0) == (y == 1))), jnp.sum(valid))

    def predict(self, logits):
        return (logits[..., 0] > 0).astype(jnp.int32)

    def values(self, logits):
        return jax.nn.sigmoid(logits)

    def metrics(self, y_true, y_pred):
        return {"accuracy": float(np.mean(y_true == y_pred)), "examples": int(len(y_true))}

    def report_lines(self, summary):
        return [f"test accuracy {summary['test'][self.name]['accuracy']:.3f} (a toy flag)"]

    def output(self, values):
        return {"flag": bool(values[0] >= self.options.cutoff), "p": float(values[0])}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scaled(weighting.Method):
    """A toy weighting method with an option of its own: every task's loss times ``factor``."""

    about = "every loss times a factor"
    factor: float = option(1.0, "what every task's loss is multiplied by", POSITIVE)

    def weights(self, state, losses, present, key):
        w = jnp.full(losses.shape, self.factor, jnp.float32)
        return w, jnp.sum(w * losses), state


@dataclasses.dataclass(frozen=True)
class BarOptions:
    separator: str = option("|", "what parts a line's fields")


def read_bar(path, columns, options: BarOptions):
    """A toy format: a header line of field names, then one record per line, fields parted by ``separator``."""
    lines = path.read_text().splitlines()
    names = lines[0].split(options.separator)
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split(options.separator)
        if len(parts) != len(names):
            rows.append(Row(n, {}, f"{len(parts)} fields, header has {len(names)}"))
        else:
            rows.append(Row(n, {c: parts[names.index(c)] for c in columns}))
    return rows


@pytest.fixture
def flag_type():
    register("flag")(Flag)
    yield Flag
    del REGISTRY["flag"]


@pytest.fixture
def plugins(flag_type):
    """A task type, a weighting method and a reader, each with an option of its own, registered from here."""
    weighting.register("scaled")(Scaled)
    readers.register("bar", [".bar"], BarOptions)(read_bar)
    yield
    del weighting.REGISTRY["scaled"], readers.READERS["bar"]


def test_a_type_a_weighting_method_and_a_reader_from_a_test_file_train_export_and_predict(
    tmp_path, tiny_bert, tiny_data, plugins
):
    """Nothing under mtl_jax/ names them: each brings its options, which reach the flags, the config
    file, the checks, the export and predict."""
    rows = [("a match goal team story", "no"), ("great fun", "yes"), ("dull mess", "no"), ("great fun again", "yes")]
    lines = ["text;flag"] + [f"{rows[i % 4][0]} #{i};{rows[i % 4][1]}" for i in range(120)]
    (tmp_path / "flags.bar").write_text("\n".join(lines) + "\n")  # the reader's option: separator ";"
    fun = "  - name: fun\n    type: flag\n    train: flags.bar\n    label_column: flag\n    separator: ';'\n"
    tasks = (tiny_data / "tasks.yaml").read_text().replace("train: ", f"train: {tiny_data}/") + fun
    (tmp_path / "tasks.yaml").write_text(tasks + "    cutoff: 0.25\n")
    out = tmp_path / "run"
    args = tiny_train_args(tiny_bert, tiny_data, "--freeze", "none", "--epochs", "3", "--out", str(out))
    args[1] = str(tmp_path / "tasks.yaml")
    refused = cli("train", *args, "--loss-weighting", "scaled", "--scaled-factor", "0")
    assert refused.returncode == 2 and "--scaled-factor 0.0: must be positive" in refused.stderr
    (tmp_path / "typo.yaml").write_text(tasks + "    cutof: 0.25\n")
    typo = cli("train", *args[:1], str(tmp_path / "typo.yaml"), *args[2:])
    assert typo.returncode == 2 and "unknown task key(s) cutof; known: name" in typo.stderr
    assert "cutoff" in typo.stderr and "separator" in typo.stderr
    r = cli("train", *args, "--loss-weighting", "scaled", "--scaled-factor", "0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["scaled_factor"] == 0.5
    train = [
        rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if rec["split"] == "train"
    ]
    assert {rec[t]["weight"] for rec in train for t in ("topic", "sentiment", "fun")} == {0.5}
    meta = json.loads((out / "export" / "mtl_jax.json").read_text())
    assert next(t for t in meta["tasks"] if t["name"] == "fun")["cutoff"] == 0.25
    summary = json.loads((out / "summary.json").read_text())
    # every task learns well above chance (1/3, 1/2, 1/2): each is learnable from one word
    assert summary["test"]["topic"]["accuracy"] >= 0.75 and summary["test"]["topic"]["macro_f1"] >= 0.7
    assert summary["test"]["sentiment"]["accuracy"] >= 0.9 and summary["test"]["fun"]["accuracy"] >= 0.9
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "validation"]
    assert (
        set(val[-1]["fun"]) == {"loss", "accuracy", "examples", "primary"} and val[-1]["fun"]["primary"] == "accuracy"
    )
    assert "mean_primary" in val[-1]  # the tasks' primary metrics differ: macro_f1 and accuracy
    assert "a toy flag" in (out / "report.md").read_text()
    predictor = load(out / "export")
    assert next(t for t in predictor.task_objects if t.name == "fun").options.cutoff == 0.25
    (row,) = predictor.predict(["great fun #999"])
    assert row["fun"]["flag"] is True and row["topic"].label in ("sports", "politics", "tech")
    (tmp_path / "queries.bar").write_text("id|text\n1|dull mess #998\n2|great fun #999\n")  # the default separator
    res = cli("predict", "--model", str(out / "export"), "--input", str(tmp_path / "queries.bar"))
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [g["text"] for g in got] == ["dull mess #998", "great fun #999"]
    assert got[1]["fun"]["flag"] is True and got[1]["fun"]["p"] >= 0.25


def test_an_unknown_task_type_is_refused_with_the_task_named():
    with pytest.raises(MtlError, match="task t: unknown type 'flagg'; known: classification"):
        build(TaskConfig(name="t", train="x.csv", type="flagg"))


def test_classification_loss_and_metrics_are_the_tasks():
    (task,) = of_heads((("a", 3),))
    logits = jnp.asarray([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    y = jnp.asarray([0, 2, -1])
    sums = task.loss_sums(logits, y)
    logp = np.log(np.exp(np.asarray(logits, np.float64)) / np.exp(np.asarray(logits, np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(float(sums.loss_sum), -(logp[0, 0] + logp[1, 2]), rtol=1e-6)
    assert int(sums.count) == 2 and int(sums.correct) == 2
    y_true, y_pred = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2])
    assert task.metrics(y_true, y_pred) == classification_report(y_true, y_pred, ("0", "1", "2"))
    assert task.score(task.metrics(y_true, y_pred)) == pytest.approx((1 + 0 + 0.8) / 3)


def test_a_split_evaluated_in_batches_gives_the_metrics_of_all_its_examples_at_once():
    """Evaluation adds a split batch by batch: classification keeps its confusion matrix only, the other
    types their examples, put back in the split's order; either way the figures of the whole split."""
    rng = np.random.default_rng(0)
    n = 500
    order = rng.permutation(n)  # (batches come in packing order, not the split's)
    batches = np.array_split(order, 7)
    (classes,) = of_heads((("a", 3),))
    y_true, y_pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    state = classes.metric_state()
    for b in batches:
        state = classes.add_to_metrics(state, b, y_true[b], y_pred[b])
    assert isinstance(state, np.ndarray) and state.shape == (3, 3)  # nothing per example
    assert classes.finish_metrics(state, y_true[:0]) == classes.metrics(y_true, y_pred)
    score = build(TaskConfig(name="s", train="x.csv", type="regression")).with_labels([])
    truth, guess = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    state = score.metric_state()
    for b in batches:
        state = score.add_to_metrics(state, b, truth[b], guess[b])
    assert score.finish_metrics(state, truth[:0]) == score.metrics(truth, guess)


@pytest.mark.parametrize(
    "y_true, y_pred, want",
    [
        # three classes: confusion [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], {"p": [1 / 2, 2 / 3, 1], "r": [1 / 2, 1, 1 / 2], "acc": 4 / 6}),
        # class 2 never predicted: its precision, recall and F1 are 0
        ([0, 1, 2], [0, 1, 1], {"p": [1, 1 / 2, 0], "r": [1, 1, 0], "acc": 2 / 3}),
        # class 2 absent from the labels but predicted once: precision 0, recall 0 (no examples), F1 0
        ([0, 0, 1], [0, 2, 1], {"p": [1, 1, 0], "r": [1 / 2, 1, 0], "acc": 2 / 3}),
    ],
)
def test_classification_report_against_hand_counts(y_true, y_pred, want):
    report = classification_report(np.array(y_true), np.array(y_pred), ("a", "b", "c"))
    p, r = np.array(want["p"], float), np.array(want["r"], float)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros(3), where=(p + r) > 0)
    assert report["accuracy"] == pytest.approx(want["acc"])
    assert [report["precision"][c] for c in "abc"] == pytest.approx(p.tolist())
    assert [report["recall"][c] for c in "abc"] == pytest.approx(r.tolist())
    assert report["macro_f1"] == pytest.approx(f1.mean())  # every label counts, absent ones too
    assert report["support"] == {c: y_true.count(i) for i, c in enumerate("abc")}
    assert sum(map(sum, report["confusion"])) == len(y_true)
