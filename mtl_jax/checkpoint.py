"""Training checkpoints (orbax) for exact resume, and the exported model directory.

Checkpoints live in ``<run>/checkpoints/<step>/`` and hold the train state (params,
optimizer state, step), the running metric sums, and a JSON ``meta`` with the data
pipeline's position (epoch, batches done in it), the best epoch so far and timing.
orbax writes each into a temporary folder and renames it when complete, so a
checkpoint cut short by a crash is never listed nor restored. The newest ``keep``
and the best (by mean validation macro-F1) are kept.

The export is a sentence-transformers directory (PyTorch-named DistilBERT
safetensors, config.json, modules.json, 1_Pooling, tokenizer) plus the task heads
(``heads.safetensors``) and ``mtl_jax.json`` (tasks, labels, file checksums).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from mtl_jax.errors import MtlError

EXPORT_FORMAT = 1
META_FILE = "mtl_jax.json"


# ---------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """A thin layer over ``orbax.checkpoint.CheckpointManager`` with the fallbacks a user needs."""

    def __init__(self, folder: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        self.folder = Path(folder).absolute()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            create=True,
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=lambda m: m["mean_macro_f1"], reverse=False, n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
        )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
        ocp = self._ocp
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=None if score is None else {"mean_macro_f1": score},
                force=True,
            )
            self.manager.wait_until_finished()
        except Exception as e:  # disk full, permissions, ...: the previous checkpoints are untouched
            previous = [s for s in self.steps() if s != step]
            kept = f"; the checkpoint at step {previous[-1]} is intact" if previous else ""
            raise MtlError(f"{self.folder / str(step)}: could not save checkpoint ({type(e).__name__}: {e}){kept}") from None

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        ocp = self._ocp
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"])

    def restore_meta(self, step: int) -> dict:
        path = self.folder / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MtlError(f"{path}: unreadable checkpoint metadata ({e})") from None

    def close(self) -> None:
        self.manager.close()


def restore_latest(ckpts: Checkpoints, make_target, log) -> tuple[Any, dict, int] | None:
    """The newest checkpoint that restores, falling back (and saying so) past damaged ones.

    ``make_target(meta)`` builds the pytree whose structure the saved state has.
    """
    for step in reversed(ckpts.steps()):
        where = ckpts.folder / str(step)
        try:
            meta = ckpts.restore_meta(step)
            state, meta = ckpts.restore(step, make_target(meta))
            return state, meta, step
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            aside = where.with_name(f"damaged-{step}")
            shutil.rmtree(aside, ignore_errors=True)
            where.rename(aside)  # kept for inspection, out of the manager's way
            ckpts.manager.reload()
            log(f"{where}: checkpoint is damaged or unreadable ({reason[:200]}); moved to {aside.name}, trying an older one")
    return None


# ---------------------------------------------------------------------------- export


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_model(folder: Path, encoder_spec, encoder_params, head_params: dict, hf_tokenizer,
                 tasks: Sequence[tuple[str, Sequence[str]]], pooling: str) -> Path:
    """Write a self-contained model directory (see module docstring); returns it.

    Written into a sibling temporary folder and renamed, so a crash never leaves a
    half-written export behind.
    """
    from safetensors.numpy import save_file

    from mtl_jax.pretrained import flax_to_torch_state

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = encoder_spec.config.to_dict()
    config.update(model_type="distilbert", architectures=["DistilBertModel"])
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in flax_to_torch_state(jax.device_get(encoder_params)).items()}
    save_file(state, str(tmp / "model.safetensors"))
    hf_tokenizer.save_pretrained(str(tmp))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder_spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (tmp / "2_Normalize").mkdir()
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": encoder_spec.config.dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    (tmp / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": encoder_spec.max_length, "do_lower_case": encoder_spec.lowercase}))
    heads = {f"{t}.{k}": np.asarray(v, np.float32) for t, p in jax.device_get(head_params).items() for k, v in p.items()}
    save_file(heads, str(tmp / "heads.safetensors"))
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    meta = {
        "format": EXPORT_FORMAT,
        "tasks": [{"name": name, "labels": list(labels)} for name, labels in tasks],
        "pooling": pooling,
        "normalize": encoder_spec.normalize,
        "max_length": encoder_spec.max_length,
        "files": {f: _sha256(tmp / f) for f in files},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def verify_export(folder: Path) -> dict:
    """The export's metadata, after checking that every listed file is present and unaltered."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MtlError(f"{folder}: no such model directory")
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise MtlError(f"{meta_path}: missing: not an mtl_jax export (train with scripts/train.py to make one)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MtlError(f"{meta_path}: unreadable ({e})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise MtlError(f"{meta_path}: export format {meta.get('format')!r} is not {EXPORT_FORMAT}")
    for name, digest in meta["files"].items():
        path = folder / name
        if not path.is_file():
            raise MtlError(f"{path}: missing from the exported model")
        if _sha256(path) != digest:
            raise MtlError(f"{path}: altered or corrupted (checksum differs from {META_FILE})")
    return meta


@dataclass
class Prediction:
    label: str
    probs: dict[str, float]


class Predictor:
    """A trained multi-task model: ``predict()`` per task labels and probabilities, ``encode()`` embeddings."""

    def __init__(self, folder: Path):
        from safetensors.numpy import load_file

        from mtl_jax.model import MultiTaskModel, embed_packed, load_encoder

        meta = verify_export(folder)
        self.folder = Path(folder)
        self.tasks = [(t["name"], tuple(t["labels"])) for t in meta["tasks"]]
        self.encoder = load_encoder(folder)
        dim = self.encoder.dim
        raw = load_file(str(self.folder / "heads.safetensors"))
        heads = {}
        for name, labels in self.tasks:
            want = {"kernel": (dim, len(labels)), "bias": (len(labels),)}
            heads[name] = {}
            for k, shape in want.items():
                arr = raw.get(f"{name}.{k}")
                if arr is None or tuple(arr.shape) != shape:
                    got = None if arr is None else tuple(arr.shape)
                    raise MtlError(f"{self.folder / 'heads.safetensors'}: {name}.{k} has shape {got}, expected {shape}")
                heads[name][k] = arr
        self.params = {"encoder": self.encoder.params, "heads": jax.tree.map(jax.numpy.asarray, heads)}
        self.model = MultiTaskModel(self.encoder.config, tasks=tuple((n, len(l)) for n, l in self.tasks), pooling=meta["pooling"])

        @jax.jit
        def probs(params, ids, positions, segments):
            pooled = embed_packed(self.encoder.config, params["encoder"], ids, positions, segments, self.model.pooling)
            logits = self.model.apply({"params": params}, pooled, method=MultiTaskModel.classify)
            return {t: jax.nn.softmax(v, axis=-1) for t, v in logits.items()}

        self._probs = probs

    def encode(self, sentences, **kw) -> np.ndarray:
        return self.encoder.encode(sentences, **kw)

    def predict_proba(self, sentences, batch_size: int = 64, progress: bool | None = None) -> dict[str, np.ndarray]:
        """Per task ``[N, C]`` class probabilities, rows in input order."""
        empty = {name: np.zeros((0, len(labels)), np.float32) for name, labels in self.tasks}
        out = self.encoder.map_packed(functools.partial(self._probs, self.params), sentences,
                                       batch_size=batch_size, progress=progress, empty=empty)
        return {name: out[name] for name, _ in self.tasks}

    def predict(self, sentences, batch_size: int = 64, progress: bool | None = None) -> list[dict[str, Prediction]]:
        probs = self.predict_proba(sentences, batch_size=batch_size, progress=progress)
        rows = []
        for i in range(len(next(iter(probs.values()))) if probs else 0):
            row = {}
            for name, labels in self.tasks:
                p = probs[name][i]
                row[name] = Prediction(labels[int(np.argmax(p))], {l: float(x) for l, x in zip(labels, p)})
            rows.append(row)
        return rows


def load(path: str | Path) -> Predictor:
    """Load an exported model directory (``<run>/export``)."""
    return Predictor(Path(path))
