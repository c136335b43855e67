"""What tests share besides fixtures: running a command in-process, the tiny checkpoints'
writer, the PyTorch side, and small builders (imported by test modules; conftest.py holds the
fixtures and the environment every test runs in)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from mtl_jax.data.assets import embedded_model_dir
from mtl_jax.model.pretrained import flax_to_torch_state

ROOT = Path(__file__).resolve().parents[1]

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


def train_args(tiny_bert: Path, tiny_data: Path, out: Path, *extra: str) -> list[str]:
    """The checkpointed tiny run the fault and export tests share: 12 steps, a checkpoint every 3, a
    freezing phase change and famo's state (what a resume must restore)."""
    return tiny_train_args(
        tiny_bert,
        tiny_data,
        *("--out", str(out), "--max-steps", "12", "--save-every", "3", "--log-every", "1"),
        *("--freeze", "backbone,none@step:4", "--keep", "5"),
        *("--loss-weighting", "famo"),  # task logits and their Adam state: state a resume must restore too
        *extra,
    )


def of_heads(heads) -> tuple:
    """Classification tasks for a model's ``(name, classes)`` heads, labels named ``0, 1, ...``."""
    from mtl_jax.tasks import TaskConfig, build

    return tuple(build(TaskConfig(name, ""), tuple(map(str, range(n)))) for name, n in heads)


def write_file(path: Path, content: str | bytes) -> Path:
    """``content`` (text as UTF-8, or bytes as they are) written to ``path``."""
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def yes_no_rows(n: int = 40, sep: str = ",") -> str:
    """``n`` rows of a text and a yes / no label, without a header."""
    return "".join(f"sentence number {i}{sep}{'yes' if i % 2 else 'no'}\n" for i in range(n))


def file_task(path: Path, **kw):
    """A classification task on ``path``'s ``text`` and ``label`` columns (``kw``: its other keys)."""
    from mtl_jax.tasks import TaskConfig

    return TaskConfig(kw.pop("name", "t"), str(path), text_column="text", label_column="label", **kw)
