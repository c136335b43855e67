"""The prepared token store: the same ids and labels as reading and tokenizing the files, nothing
read again on a second run, a resume refused when its data changed, and a preparation killed (or a
store damaged) never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mtl_jax.data import load, spool, store
from mtl_jax.data.batching import tokenize
from mtl_jax.data.load import SPLITS, load_tasks
from mtl_jax.data.packing import unit_segments
from mtl_jax.errors import MtlError
from mtl_jax.inference import load_encoder
from mtl_jax.tasks import TaskConfig
from tests.helpers import ROOT, cli, tiny_train_args
from tests.typed_data import write_typed_data


def _tasks(folder):
    from mtl_jax.config import load_config_file

    return load_config_file(write_typed_data(folder) / "types.yaml")["task_list"]


def _prepare(tasks, tokenizer, cache, **kw):
    key = store.data_key(tasks, tokenizer, 64, 0, False)
    return store.prepare(tasks, tokenizer, key, str(cache), **kw)


def _read(tasks, tokenizer):
    """The reference: the files read whole and each split tokenized in one call, no store."""
    key = store.data_key(tasks, tokenizer, 64, 0, False)
    data = load_tasks(tasks, seed=0)
    return store.Prepared(data.tasks, {s: tokenize(data.splits[s], tokenizer, 64) for s in SPLITS}, data.notes, key)


def _same(a, b):
    """Two Prepared hold the same examples: ids per unit (tuples stay tuples), labels, sources."""
    assert a.names == b.names and a.labels == b.labels
    for s in SPLITS:
        x, y = a.splits[s], b.splits[s]
        assert len(x) == len(y) and x.truncated == y.truncated
        np.testing.assert_array_equal(x.source, y.source)
        np.testing.assert_array_equal(x.lengths, y.lengths)
        for i in range(len(x)):
            u, v = x.ids[i], y.ids[i]
            assert isinstance(u, tuple) == isinstance(v, tuple)
            for p, q in zip(unit_segments(u), unit_segments(v), strict=True):
                np.testing.assert_array_equal(p, q)
        for t in a.names:
            if x.labels[t].dtype == object:
                assert [None if v is None else list(v) for v in x.labels[t]] == [
                    None if v is None else list(v) for v in y.labels[t]
                ]
            else:
                np.testing.assert_array_equal(x.labels[t], y.labels[t])


def test_the_store_gives_the_ids_and_labels_of_reading_the_files_and_a_second_run_reads_nothing(
    tmp_path, tiny_bert, monkeypatch
):
    tasks = _tasks(tmp_path)  # seven types: pairs, tagging (per-token labels), multi-label, retrieval ...
    tokenizer = load_encoder(str(tiny_bert)).tokenizer
    read = _read(tasks, tokenizer)
    monkeypatch.setattr(spool, "TAKE_CHUNK", 5)  # examples gathered a few at a time
    monkeypatch.setattr(load, "CHUNK_ROWS", 7)  # and read and tokenized a few rows at a time
    stored = _prepare(tasks, tokenizer, tmp_path / "cache", log=lambda m: None)
    scratch = _prepare(tasks, tokenizer, "off")
    assert stored.folder.parent == tmp_path / "cache" and scratch.folder is None
    assert stored.splits["train"].ids.ids.dtype == np.uint16  # 30,522 ids fit 16 bits
    _same(read, stored)
    _same(read, scratch)
    monkeypatch.setattr(store, "load_tasks", lambda *a, **k: pytest.fail("the second run read the files"))
    monkeypatch.setattr(store, "TokenSpool", lambda *a, **k: pytest.fail("the second run tokenized"))
    again = _prepare(tasks, tokenizer, tmp_path / "cache")
    assert again.folder == stored.folder
    _same(read, again)


@pytest.mark.slow  # two child processes: make test-slow
def test_large_inputs_are_prepared_in_a_child_process_with_the_same_store_and_bad_row_messages(
    tmp_path, tiny_bert, monkeypatch
):
    tasks = _tasks(tmp_path)
    tokenizer = load_encoder(str(tiny_bert)).tokenizer
    monkeypatch.setattr(store, "APART_BYTES", 0)  # every input counts as large
    monkeypatch.setattr(store, "write_store", lambda *a, **k: pytest.fail("prepared in the training process"))
    _same(_read(tasks, tokenizer), _prepare(tasks, tokenizer, tmp_path / "cache", log=lambda m: None))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f'{{"text": "a story {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(30)))
    bad.write_text(bad.read_text() + '{"text": "what", "label": NaN}\n')
    with pytest.raises(MtlError, match=r"^\S*bad\.jsonl:31: missing label in column 'label'"):
        _prepare([TaskConfig("t", str(bad), text_column="text", label_column="label")], tokenizer, tmp_path / "c2")
    assert [p.name for p in (tmp_path / "c2").iterdir() if not p.name.startswith(".")] == []


def test_a_damaged_store_is_named_removed_and_prepared_again(tmp_path, tiny_bert):
    tasks = _tasks(tmp_path)
    tokenizer = load_encoder(str(tiny_bert)).tokenizer
    first = _prepare(tasks, tokenizer, tmp_path / "cache", log=lambda m: None)
    (first.folder / "train" / "ids.npy").write_bytes(b"not an array")
    said = []
    again = _prepare(tasks, tokenizer, tmp_path / "cache", log=said.append)
    assert said[0].startswith(f"{first.folder}: damaged (train/ids.npy") and "preparing it again" in said[0]
    _same(_read(tasks, tokenizer), again)


KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import numpy as np
from mtl_jax.config import load_config_file
from mtl_jax.data import store
from mtl_jax.inference import load_encoder
saves = [0]
original = np.save
def dying(*a, **k):
    saves[0] += 1
    if saves[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*a, **k)
np.save = dying
tasks = load_config_file({config!r})["task_list"]
tokenizer = load_encoder({model!r}).tokenizer
store.prepare(tasks, tokenizer, store.data_key(tasks, tokenizer, 64, 0, False), {cache!r})
"""


@pytest.mark.slow  # real processes killed: make test-slow
@pytest.mark.parametrize("at", [1, 9, 30])
def test_a_preparation_killed_at_any_moment_leaves_no_store_a_later_run_uses(tmp_path, tiny_bert, at):
    config = write_typed_data(tmp_path) / "types.yaml"
    cache = tmp_path / "cache"
    code = KILLED.format(root=str(ROOT), at=at, config=str(config), model=str(tiny_bert), cache=str(cache))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []  # only the unfinished one, hidden
    tasks = _tasks(tmp_path)
    tokenizer = load_encoder(str(tiny_bert)).tokenizer
    _same(_read(tasks, tokenizer), _prepare(tasks, tokenizer, cache, log=lambda m: None))


def test_prepare_ahead_then_train_and_resume_read_no_file_and_changed_data_is_refused(tmp_path, tiny_bert, tiny_data):
    data = tmp_path / "data"
    data.mkdir()
    for f in ("topic.csv", "reviews.jsonl", "tasks.yaml"):
        (data / f).write_bytes((tiny_data / f).read_bytes())
    cache = tmp_path / "cache"
    base = tiny_train_args(tiny_bert, data, "--data-cache", str(cache))
    r = cli("prepare", *base)
    assert r.returncode == 0, r.stderr
    folder = r.stdout.split(":")[0]
    assert os.path.isdir(folder) and "train 136, validation 17, test 17 examples (prepared now)" in r.stdout
    out = tmp_path / "run"
    r = cli("train", *base, "--out", str(out), "--max-steps", "4", "--save-every", "2")
    assert r.returncode == 0 and f"data: {folder} (reused)" in r.stderr, r.stderr  # read from the store
    assert json.loads((out / "config.json").read_text())["data_fingerprint"] == os.path.basename(folder)
    r = cli("train", *base, "--out", str(out), "--max-steps", "6", "--resume")
    assert r.returncode == 0 and f"data: {folder} (reused)" in r.stderr, r.stderr
    with open(data / "topic.csv", "a") as f:
        f.write('"a vote story, number 999",politics\n')
    r = cli("train", *base, "--out", str(out), "--max-steps", "8", "--resume")
    assert r.returncode == 2 and f"{(data / 'topic.csv').resolve()} changed since the run started" in r.stderr


def test_data_cache_off_prepares_nothing(tmp_path, tiny_bert, tiny_data):
    r = cli("prepare", *tiny_train_args(tiny_bert, tiny_data, "--data-cache", "off"))
    assert r.returncode == 2 and "--data-cache off" in r.stderr
    tasks = [TaskConfig("t", str(tiny_data / "topic.csv"))]
    key = store.data_key(tasks, load_encoder(str(tiny_bert)).tokenizer, 64, 0, False)
    assert store.prepare(tasks, load_encoder(str(tiny_bert)).tokenizer, key, "off").folder is None


def test_tokenizing_in_chunks_gives_the_ids_of_one_call(minilm, monkeypatch):
    from mtl_jax.data import text
    from mtl_jax.data.text import Joined, Segments, Words

    examples = [f"sentence {i} " + "word " * (i % 40) for i in range(50)]
    examples += [Segments((f"a {i}", f"b {i} " * (i % 9))) for i in range(20)]
    examples += [Joined((f"q {i}", "p " * 90)) for i in range(20)]
    examples += [Words(("Carol", "went", "to", f"Oslo{i}") * (1 + i % 30)) for i in range(20)]
    whole = minilm.tokenizer.encode_examples(examples, 64)
    monkeypatch.setattr(text, "ENCODE_CHUNK", 7)
    chunked = minilm.tokenizer.encode_examples(examples, 64)
    np.testing.assert_array_equal(whole.truncated, chunked.truncated)
    assert whole.truncated.any()
    for a, b in zip(whole.ids, chunked.ids, strict=True):
        for p, q in zip(unit_segments(a), unit_segments(b), strict=True):
            np.testing.assert_array_equal(p, q)
    for a, b in zip(whole.word_starts, chunked.word_starts, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
