"""Shared fixtures: tiny random BERT / DistilBERT checkpoints (2 layers, dim 32) written
as real Hugging Face directories, and small labelled data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One persistent compilation cache for the session and every script the tests start (before
# JAX is imported): each tiny model's steps compile once, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Prepared data (tokenized, memory-mapped) of the tests' runs goes here, not to the user's cache.
os.environ.setdefault("MTL_JAX_DATA_CACHE", str(ROOT / ".pytest_cache" / "data"))
# Every test runs on the CPU whatever jax build is installed (a GPU build would run in-process tests
# on the GPU and compare them with subprocess runs): set before JAX is imported, inherited by every
# process the tests start.
os.environ["JAX_PLATFORMS"] = "cpu"

from mtl_jax.training.hostmem import reuse_host_memory  # noqa: E402

reuse_host_memory()  # as the scripts do, before JAX's first computation

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import cli, train_args, write_tiny_bert  # noqa: E402

# Test files, longest first (seconds on 2 cores, cold): make test hands whole files to its two
# workers in collection order, so the long ones start first and the short ones fill the gaps.
LONGEST_FIRST = (
    "test_train_step.py",  # 90
    "test_research.py",  # 55
    "test_pretrained.py",  # 50
    "test_export.py",  # 45 (+ 60 slow)
    "test_task_types.py",  # 45 (+ 175 slow)
    "test_packing.py",  # 40
    "test_cli.py",  # 25
    "test_gradcache.py",  # 25 (+ 80 slow)
    "test_prompts.py",  # 20 (+ 15 slow)
    "test_bad_input.py",  # 15
    "test_tasks.py",  # 10
    "test_weighting.py",  # 10
    "test_store.py",  # 10 (+ 30 slow)
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2, loaded once."""
    from mtl_jax import load_encoder

    return load_encoder("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_bert")
    write_tiny_bert(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Two small tasks, each with its own CSV / JSONL file, learnable from single words."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    topics = {"sports": "match goal team", "politics": "vote senate law", "tech": "chip code robot"}
    with open(folder / "topic.csv", "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for i in range(90):
            label = list(topics)[i % 3]
            word = rng.choice(topics[label].split())
            f.write(f'"a {word} story, number {i}",{label}\n')
    with open(folder / "reviews.jsonl", "w", encoding="utf-8") as f:
        for i in range(80):
            good = i % 2 == 0
            f.write(
                json.dumps(
                    {"review": ("great fun" if good else "dull mess") + f" #{i}", "stars": "pos" if good else "neg"}
                )
                + "\n"
            )
    (folder / "tasks.yaml").write_text(
        "tasks:\n"
        "  - name: topic\n    train: topic.csv\n    text_column: text\n    label_column: label\n"
        "  - name: sentiment\n    train: reviews.jsonl\n    text_column: review\n    label_column: stars\n"
    )
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_bert, tiny_data) -> Path:
    """One finished checkpointed tiny run (:func:`tests.helpers.train_args`), for the tests that only read it."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = cli("train", *train_args(tiny_bert, tiny_data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out
