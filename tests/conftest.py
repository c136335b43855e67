"""Shared fixtures: tiny random BERT / DistilBERT checkpoints (2 layers, dim 32) written
as real Hugging Face directories, and small labelled data files."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One persistent compilation cache for the session and every script the tests start (before
# JAX is imported): each tiny model's steps compile once, not once per process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Every test runs on the CPU whatever jax build is installed (a GPU build would run in-process tests
# on the GPU and compare them with subprocess runs): set before JAX is imported, inherited by every
# process the tests start.
os.environ["JAX_PLATFORMS"] = "cpu"

from mtl_jax.training.hostmem import reuse_host_memory  # noqa: E402

reuse_host_memory()  # as the scripts do, before JAX's first computation

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mtl_jax.data.assets import embedded_model_dir  # noqa: E402
from mtl_jax.model.pretrained import flax_to_torch_state  # noqa: E402

# Test files, longest first (seconds on 2 cores, cold): make test hands whole files to its two
# workers in collection order, so the long ones start first and the short ones fill the gaps.
LONGEST_FIRST = (
    "test_checkpoint.py",  # 80
    "test_research.py",  # 55
    "test_task_types.py",  # 45 (+ 150 slow)
    "test_train_step.py",  # 50
    "test_cli.py",  # 35
    "test_bad_input.py",  # 35
    "test_packing.py",  # 30
    "test_parallel.py",  # 20 (+ 25 slow)
    "test_pretrained.py",  # 20
    "test_faults.py",  # 10 (+ 30 slow)
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")

TINY_BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


def cli(command: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``mtl_jax.commands.<command>`` run in this process as its console script runs it (exit
    status, stdout, stderr): no interpreter start or imports per call. Tests that need a real
    process (signals, SIGKILL, several processes, the scripts/ entry points) start one instead."""
    from mtl_jax.cli import run_cli

    main = importlib.import_module(f"mtl_jax.commands.{command}").main
    out, err = io.StringIO(), io.StringIO()
    stdin_before = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = run_cli(lambda: main(list(args)))
            except SystemExit as e:  # argparse / tyro: --help, a malformed flag
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.stdin = stdin_before
    return subprocess.CompletedProcess([command, *args], code, out.getvalue(), err.getvalue())


def dot_products(jaxpr):
    """The matrix products (``dot_general`` equations) in ``jaxpr`` and the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from dot_products(inner)


def tiny_train_args(tiny_bert: Path, tiny_data: Path, *options: str) -> list[str]:
    """scripts/train.py's flags for the tiny encoder on the tiny tasks (batch 8, lr 1e-3, no
    progress bar), then ``options``."""
    return [
        *("--config", str(tiny_data / "tasks.yaml"), "--encoder", str(tiny_bert)),
        *("--batch-size", "8", "--lr", "1e-3", "--no-progress"),
        *options,
    ]


def assert_export_reproduces_test_metrics(run: Path):
    """The run's export, loaded as a user loads it, gives the run's own test accuracy and, from its
    probabilities, the run's test loss within 1e-5: the exported weights are the trained ones."""
    from mtl_jax import load
    from mtl_jax.config import TaskConfig
    from mtl_jax.data.load import load_tasks

    summary = json.loads((run / "summary.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    tasks = [TaskConfig(**t) for t in cfg["task_list"]]
    test = load_tasks(tasks, seed=cfg["seed"]).splits["test"]
    predictor = load(run / "export")
    probs = predictor.predict_proba(test.texts, batch_size=5)
    for name, _labels in predictor.tasks:
        has = test.labels[name] >= 0
        acc = float((probs[name][has].argmax(1) == test.labels[name][has]).mean())
        assert acc == pytest.approx(summary["test"][name]["accuracy"], abs=1e-9)
        nll = float(-np.log(probs[name][has, test.labels[name][has]]).mean())
        assert nll == pytest.approx(summary["test"][name]["loss"], rel=1e-5, abs=0)
    return predictor


def torch_vectors(folder: Path, sentences: list[str], venv: str = ".peer/venv") -> dict:
    """``tests/torch_side.py`` in a PyTorch venv (``make peer``): ``folder``'s sentence vectors from
    sentence-transformers ("st") and from AutoModel pooled by hand ("auto"), and the versions."""
    python = ROOT / venv / "bin" / "python"
    assert python.exists(), f"{python} missing: `make peer` builds the PyTorch venvs that make test uses"
    r = subprocess.run(
        [str(python), str(ROOT / "tests" / "torch_side.py"), str(folder)],
        input=json.dumps(sentences),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    return out | {k: np.asarray(out[k], np.float32) for k in ("st", "auto")}


def copy_tokenizer(dst: Path) -> None:
    src = embedded_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)


def write_tiny_bert(dst: Path, seed: int = 0, config: dict | None = None) -> tuple[dict, dict]:
    """A random BERT checkpoint (PyTorch names, safetensors) and its Flax params."""
    from transformers import BertConfig, FlaxBertModel

    config = dict(TINY_BERT, **(config or {}))
    dst.mkdir(parents=True, exist_ok=True)
    model = FlaxBertModel(BertConfig(**config), seed=seed)
    # Make the token-type and position rows distinct so the folding is really tested.
    params = jax.tree.map(np.asarray, model.params)
    state = {f"bert.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in flax_to_torch_state(params).items()}
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    copy_tokenizer(dst)
    return config, params


def by_task(labels: np.ndarray, names=("task_a", "task_b")) -> dict:
    """Label columns ``[N, T]`` as the per-task label arrays batches carry."""
    return {name: labels[:, i] for i, name in enumerate(names)}


def optim(total_steps: int = 100, **options):
    """An OptimConfig from TrainConfig's defaults (warm-up off) and ``options`` (TrainConfig fields)."""
    from mtl_jax.config import TrainConfig
    from mtl_jax.training.optim import OptimConfig

    return OptimConfig.from_config(TrainConfig(**({"warmup": 0.0} | options)), total_steps)


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
