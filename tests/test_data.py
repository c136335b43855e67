"""Readers, label vocabularies, splits, sampling, bucketing and the bad-input matrix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mtl_jax import MtlError
from mtl_jax.config import DEFAULT_TASKS, TaskConfig
from mtl_jax.data import packing
from mtl_jax.data.batching import InputPipeline
from mtl_jax.data.load import _split_indices, load_tasks, read_rows
from mtl_jax.data.packing import MAX_SEGMENTS
from mtl_jax.data.plans import epoch_plan, sampling_counts, source_members, task_plan
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.tasks.base import has_label
from tests.helpers import by_task, file_task, write_file

# ---------------------------------------------------------------------------- readers


def test_csv_quoting_bom_crlf(tmp_path):
    p = write_file(tmp_path / "a.csv", b'\xef\xbb\xbftext,label\r\n"hello, ""world""\r\nsecond line",x\r\nplain,y\r\n')
    rows = list(read_rows(p, ["text", "label"]))
    assert [r.fields for r in rows] == [
        {"text": 'hello, "world"\r\nsecond line', "label": "x"},
        {"text": "plain", "label": "y"},
    ]
    assert [r.line for r in rows] == [2, 4]


def test_tsv_and_jsonl(tmp_path):
    tsv = write_file(tmp_path / "a.tsv", "label\ttext\nx\tfirst, with comma\n")
    assert list(read_rows(tsv, ["text", "label"]))[0].fields == {"text": "first, with comma", "label": "x"}
    jl = write_file(
        tmp_path / "a.jsonl",
        json.dumps({"text": "é ünïcode", "label": 3}) + "\n\n" + json.dumps({"text": "b", "label": "y"}) + "\n",
    )
    rows = list(read_rows(jl, ["text", "label"]))
    assert [(r.line, r.fields["text"], r.fields["label"]) for r in rows] == [(1, "é ünïcode", "3"), (3, "b", "y")]


def test_embedded_default_data_counts_and_splits():
    data = load_tasks(DEFAULT_TASKS, seed=0)
    assert data.labels == {"task_a": ("Democratic", "Moderator", "Republican"), "task_b": ("negative", "positive")}
    sizes = {s: len(e) for s, e in data.splits.items()}
    assert sum(sizes.values()) == 1122 + 12808
    a = data.splits["train"].labels["task_a"]
    b = data.splits["train"].labels["task_b"]
    assert (a >= 0).sum() == 898 and (b >= 0).sum() == 10248
    assert not ((a >= 0) & (b >= 0)).any()  # each example carries one task's label
    again = load_tasks(DEFAULT_TASKS, seed=0)
    assert again.splits["test"].texts == data.splits["test"].texts
    other = load_tasks(DEFAULT_TASKS, seed=1)
    assert other.splits["test"].texts != data.splits["test"].texts
    # stratified exactly: each class of each task gives round(10%) of its examples to validation and
    # to test (so within floor/ceil of its share), for both default tasks and two seeds
    counts = {"task_a": (348, 320, 454), "task_b": (5405, 7403)}
    for split_data in (data, other):
        for name, per_class in counts.items():
            for split in ("validation", "test"):
                y = split_data.splits[split].labels[name]
                got = np.bincount(y[y >= 0], minlength=len(per_class))
                assert got.tolist() == [int(round(n * 0.1)) for n in per_class], (name, split, got)


def test_split_indices_keep_their_order():
    """The seeded split is part of every run's identity (its test metrics, its data store): these are
    the indices a seed gave before the split was rewritten to build no Python lists; any change to
    how it draws would move examples between splits."""
    y = np.array([0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 0, 1, 2, 0, 0, 1, 1, 0, 2, 0, 0, 1, 0, 0, 2, 1, 0, 0, 1, 0])
    train, validation, test = _split_indices(y, 3)
    assert validation.tolist() == [8, 22, 29] and test.tolist() == [3, 4, 19]
    assert train.tolist() == sorted(set(range(30)) - {8, 22, 29, 3, 4, 19})
    assert train.dtype == validation.dtype == test.dtype == np.int64


def test_explicit_labels_map_and_shared_file(tmp_path):
    p = write_file(
        tmp_path / "both.csv",
        "text,label,topic\n" + "".join(f"s{i},{'a' if i % 2 else 'b'},{'u' if i % 3 else 'v'}\n" for i in range(60)),
    )
    tasks = [
        file_task(p, name="one", labels=("b", "a")),
        TaskConfig(name="two", train=str(p), text_column="text", label_column="topic", label_map={"u": "U", "v": "V"}),
    ]
    data = load_tasks(tasks)
    assert data.labels == {"one": ("b", "a"), "two": ("U", "V")}
    train = data.splits["train"]
    assert all((y >= 0).all() for y in train.labels.values())  # one file, both labels per row
    assert sum(len(e) for e in data.splits.values()) == 60


# ---------------------------------------------------------------------------- bad input


# ---------------------------------------------------------------------------- batching


def test_sampling_counts():
    assert sampling_counts([100, 900], "proportional").tolist() == [100, 900]
    assert sampling_counts([100, 900], "uniform").tolist() == [500, 500]
    t = sampling_counts([100, 900], "temperature", 2.0)
    assert t.sum() == 1000 and t.tolist() == [250, 750]  # sqrt: 10 : 30


def _tokenized(lengths, sources):
    ids = [np.arange(n, dtype=np.int32) + 1 for n in lengths]
    return Tokenized(ids, np.zeros((len(ids), 1), np.int32), np.asarray(sources, np.int32), 0)


def test_epoch_plan_covers_every_example_once_in_batches_of_equal_tokens():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 1000)
    lengths[rng.choice(1000, 20, replace=False)] = rng.integers(65, 200, 20)  # a few long ones
    data = _tokenized(lengths, rng.integers(0, 2, 1000))
    plan = epoch_plan(data, 32, seed=0, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(1 <= len(b) <= 32 for b in plan) and sum(len(b) < 31 for b in plan) <= 4
    # the long examples share a few batches; the others' token counts are nearly equal
    long_batches = [b for b in plan if lengths[b].max() > 64]
    assert len(long_batches) <= 2 + 2  # at most one partial per source
    tokens = [lengths[b].sum() for b in plan if lengths[b].max() <= 64 and len(b) >= 31]
    assert max(tokens) - min(tokens) < 0.15 * np.mean(tokens), tokens
    assert [b.tolist() for b in epoch_plan(data, 32, 0, 0)] == [b.tolist() for b in plan]
    assert [b.tolist() for b in epoch_plan(data, 32, 0, 1)] != [b.tolist() for b in plan]


def test_uniform_sampling_draws_equally_per_source():
    data = _tokenized([5] * 1000, [0] * 100 + [1] * 900)
    flat = np.concatenate(epoch_plan(data, 16, 0, 0, sampling="uniform"))
    assert np.bincount(data.source[flat]).tolist() == [500, 500]


def test_passes_over_a_stored_split_a_range_at_a_time_equal_the_whole_array_passes(monkeypatch):
    """A store's per-example passes (lengths, widest, which examples are labelled, each source's
    members, so the plan) read it a range at a time; ranges of 7 give what whole arrays give."""
    rng = np.random.default_rng(3)
    n = 100
    units = [
        tuple(np.arange(k) + 1 for k in rng.integers(1, 9, w)) if w > 1 else np.arange(rng.integers(1, 40)) + 1
        for w in rng.integers(1, 4, n)
    ]
    labels = rng.integers(-1, 3, (n, 2)).astype(np.int32)
    source = rng.choice([0, 2, 3], n).astype(np.int32)  # source 1: no example
    listed = Tokenized(units, {"t": labels}, source, 0)
    stored = Tokenized(packing.StoredUnits.of(units), {"t": labels}, source, 0)
    whole = [listed.lengths, listed.widest, has_label(labels), source_members(source)]
    plans = [[b.tolist() for b in epoch_plan(listed, 8, 0, 0, sampling)] for sampling in ("proportional", "uniform")]
    monkeypatch.setattr(packing, "PAGED_RANGE", 7)
    assert stored.lengths.tolist() == whole[0].tolist() and stored.widest == whole[1] == 3
    assert has_label(labels).tolist() == whole[2].tolist() == (labels[:, 0] >= 0).tolist()
    assert [m.tolist() for m in source_members(source)] == [m.tolist() for m in whole[3]]
    assert [len(m) for m in whole[3]] == [int((source == s).sum()) for s in range(4)]
    assert [[b.tolist() for b in epoch_plan(stored, 8, 0, 0, s)] for s in ("proportional", "uniform")] == plans


def test_shipped_config_files_parse():
    from mtl_jax.config import load_config_file
    from tests.helpers import ROOT

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        values = load_config_file(f)
        assert values["task_list"]
    assert load_config_file(ROOT / "configs" / "default.yaml")["task_list"] == DEFAULT_TASKS


def test_config_files_grouped_by_concern_load_as_their_flat_keys(tmp_path):
    from mtl_jax.config import TrainConfig, load_config_file

    task = "tasks:\n  - name: x\n    train: a.csv\n"
    flat = write_file(
        tmp_path / "flat.yaml",
        task + "lr: 0.001\nloss_weighting: famo\nfamo_lr: 0.05\nlora_rank: 4\nfsdp: true\nout: runs/x\nepochs: 2\n",
    )
    grouped = write_file(
        tmp_path / "grouped.yaml",
        task + "optimizer: {lr: 0.001}\nweighting: {method: famo, famo_lr: 0.05}\nlora: {rank: 4}\n"
        "parallel: {fsdp: true}\noutputs: {out: runs/x}\ntraining: {epochs: 2}\n",
    )
    assert load_config_file(grouped) == load_config_file(flat)
    cfg = TrainConfig(**load_config_file(grouped))
    assert (cfg.lr, cfg.loss_weighting, cfg.famo_lr, cfg.lora_rank, cfg.fsdp) == (0.001, "famo", 0.05, 4, True)
    bad = write_file(tmp_path / "bad.yaml", task + "optimizer: {lrate: 0.1}\n")
    with pytest.raises(MtlError, match=r"bad\.yaml: optimizer: unknown option 'lrate'; known: lr, head_lr"):
        load_config_file(bad)
    twice = write_file(tmp_path / "twice.yaml", task + "lr: 0.1\noptimizer: {lr: 0.2}\n")
    with pytest.raises(MtlError, match=r"twice\.yaml: option 'lr' given twice"):
        load_config_file(twice)


def test_each_batch_holds_one_source():
    rng = np.random.default_rng(1)
    data = _tokenized(rng.integers(3, 60, 500), [0] * 40 + [1] * 460)
    plan = epoch_plan(data, 32, seed=0, epoch=0)
    assert all(len(set(data.source[b].tolist())) == 1 for b in plan)
    assert sum(len(b) for b in plan if data.source[b[0]] == 0) == 40


def test_task_plan_puts_every_task_in_every_step():
    rng = np.random.default_rng(2)
    n = 300
    lengths = rng.integers(3, 120, n)
    labels = np.full((n, 2), -1, np.int32)
    labels[:40, 0] = rng.integers(0, 3, 40)  # a small task and a large one
    labels[40:, 1] = rng.integers(0, 2, n - 40)
    data = Tokenized(
        [np.arange(k, dtype=np.int32) for k in lengths], by_task(labels), (labels[:, 0] < 0).astype(np.int32), 0
    )
    plan = task_plan(data, 16, seed=0, epoch=0)
    assert len(plan) == math.ceil(n / 16)
    for step in plan:
        assert [len(sub) for sub in step] == [8, 8]
        assert (labels[step[0], 0] >= 0).all() and (labels[step[1], 1] >= 0).all()
    small = np.concatenate([s[0] for s in plan])
    assert np.bincount(small, minlength=40)[:40].min() >= 3  # the small task cycles through all its examples
    assert [[s.tolist() for s in step] for step in task_plan(data, 16, 0, 0)] == [
        [s.tolist() for s in step] for step in plan
    ]
    pipeline = InputPipeline({"train": data}, 0, 128, 16, 16, seed=0, task_stacked=True)
    batch = pipeline.train_batch(plan[0])
    rows, length = pipeline.grids[max(pipeline.grids)].rows, max(pipeline.grids)
    assert batch.ids.shape[1] == 2 and batch.labels["task_a"].shape[1:] == (2, MAX_SEGMENTS)
    assert batch.ids.shape in {(g.rows, 2, g.length) for g in pipeline.grids.values()}
    assert len(pipeline.grids) <= 2 and rows <= 8 and length == 128
    with pytest.raises(MtlError, match="smaller than the number of tasks"):
        task_plan(data, 1, 0, 0)


def test_every_option_says_whether_a_resume_may_change_it():
    import dataclasses

    from mtl_jax.config import TrainConfig, resume_fixed

    kinds = {f.name: f.metadata.get("on_resume") for f in dataclasses.fields(TrainConfig)}
    undeclared = [name for name, kind in kinds.items() if kind not in ("fixed", "adjustable")]
    assert undeclared == []
    # the options that change the data, the model or the updates are fixed
    for name in (
        "encoder",
        "freeze",
        "batch_size",
        "lr",
        "head_lr",
        "clip_norm",
        "head_dropout",
        "seed",
        "task_list",
        "loss_weighting",
        "max_length",
        "dtype",
        "skip_bad_rows",
    ):
        assert name in resume_fixed(), name
    assert {"out", "resume", "progress", "epochs", "max_steps"}.isdisjoint(resume_fixed())


@pytest.mark.parametrize(
    "option, value, flag",
    [
        ("lr", -1.0, "--lr -1.0: must be 0 or more"),
        ("clip_norm", 0.0, "--clip-norm 0.0: must be positive"),
        ("temperature", 0.0, "--temperature 0.0: must be positive"),
        ("batch_size", 0, "--batch-size 0: must be at least 1"),
        ("warmup", 1.5, "--warmup 1.5: must be between 0 and 1"),
    ],
)
def test_out_of_range_options_name_the_flag(option, value, flag):
    from mtl_jax.config import TrainConfig

    with pytest.raises(MtlError, match=flag):
        TrainConfig(**{option: value}).check()
    negative = (TaskConfig(name="a", train="x.csv", weight=-1.0),)
    with pytest.raises(MtlError, match="task a: weight -1.0: must be 0 or more"):
        TrainConfig(task_list=negative).check()


def _retrieval_beside_classification(pairs: int = 100, others: int = 1000) -> Tokenized:
    """A retrieval task of ``pairs`` (query, positive) examples, two of which share their positive
    text, beside a classification task of ``others`` sentences (two sources)."""
    rng = np.random.default_rng(5)
    ids = [
        (rng.integers(1000, 2000, rng.integers(3, 9)), rng.integers(2000, 3000, rng.integers(3, 20)))
        for _ in range(pairs)
    ]
    ids[7] = (ids[7][0], ids[3][1].copy())  # a positive text that appears twice in the data
    ids += [rng.integers(3000, 4000, rng.integers(3, 30)) for _ in range(others)]
    n = pairs + others
    qa = np.where(np.arange(n) < pairs, 1, -1).astype(np.int32)
    cls = np.where(np.arange(n) >= pairs, np.arange(n) % 3, -1).astype(np.int32)
    return Tokenized(ids, {"qa": qa, "cls": cls}, (np.arange(n) >= pairs).astype(np.int32), 0)


def _repeats(batch, data) -> int:
    """Examples of the retrieval task in ``batch`` that share a text with an earlier one."""
    seen, repeats = set(), 0
    for i in batch:
        if data.labels["qa"][i] < 0:
            continue
        texts = {np.asarray(s).tobytes() for s in data.ids[i]}
        repeats += bool(seen & texts)
        seen |= texts
    return repeats


@pytest.mark.parametrize("sampling", ["temperature", "uniform", "every task"])
def test_no_retrieval_step_holds_an_example_or_a_text_twice(sampling):
    """A small retrieval task drawn more often than its size got copies of a pair into one batch (and
    a positive written twice in the data, both rows): in-batch negatives scored them as negatives."""
    data = _retrieval_beside_classification()
    plain = InputPipeline(
        {"train": data}, 0, 128, 32, 32, seed=0, sampling=sampling, task_stacked=sampling == "every task"
    )
    distinct = InputPipeline({"train": data}, 0, 128, 32, 32, seed=0, sampling=sampling,
                             task_stacked=sampling == "every task", distinct=("qa",))  # fmt: skip
    flat = lambda plan: [np.concatenate(step) if isinstance(step, list) else step for step in plan]  # noqa: E731
    for epoch in range(3):
        before, after = flat(plain.plan(epoch)), flat(distinct.plan(epoch))
        assert sum(_repeats(b, data) for b in before) > 0  # the old plans repeat
        assert sum(_repeats(b, data) for b in after) == 0
        drawn = lambda plan: np.bincount(np.concatenate(plan), minlength=len(data))  # noqa: E731
        assert np.abs(drawn(after) - drawn(before)).sum() <= 2 * sum(_repeats(b, data) for b in before)
        assert all(
            np.array_equal(a, b) for a, b in zip(after, flat(distinct.plan(epoch)), strict=True)
        )  # (seed, epoch)
