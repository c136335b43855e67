"""The exported model directory: what a trained run leaves for inference and for other tools.

A sentence-transformers directory (PyTorch-named safetensors, config.json, modules.json,
1_Pooling, tokenizer) plus the task heads (``heads.safetensors``) and ``mtl_jax.json`` (tasks,
labels, pooling, file checksums). It loads in sentence-transformers and
``transformers.AutoModel`` as a plain encoder (BERT where the encoder has BERT's token-type
embedding, so that those loaders feed a pair's second text its token type; DistilBERT
otherwise), and in :func:`mtl_jax.load` with its heads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from mtl_jax.errors import MtlError
from mtl_jax.tasks.base import prompts_of

EXPORT_FORMAT = 1
META_FILE = "mtl_jax.json"
# DistilBERT takes no token_type_ids: a BERT tokenizer's config would hand them to it
MODEL_INPUT_NAMES = {
    "distilbert": ["input_ids", "attention_mask"],
    "bert": ["input_ids", "token_type_ids", "attention_mask"],
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_model(
    folder: Path,
    encoder_spec,
    encoder_params,
    head_params: dict,
    hf_tokenizer,
    tasks: Sequence,
    pooling: str,
) -> Path:
    """Write a self-contained model directory (see module docstring); returns it.

    ``tasks``: the run's :class:`mtl_jax.tasks.Task` objects. Written into a sibling temporary
    folder, verified, then swapped in atomically (:func:`_swap_in`): a crash at any moment leaves
    the previous export or the new one, never a half-written one nor none.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_export(tmp, encoder_spec, encoder_params, head_params, hf_tokenizer, tasks, pooling)
    except OSError as e:  # disk full, ...: the previous export stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise MtlError(
            f"{folder}: cannot write the export ({e.strerror or e}); the previous export is unchanged"
        ) from None
    _swap_in(tmp, folder)
    return folder


def _write_export(tmp: Path, encoder_spec, encoder_params, head_params, hf_tokenizer, tasks, pooling: str) -> None:
    """Every file of the export into ``tmp``, then its metadata with their checksums, verified."""
    tmp.mkdir(parents=True)
    _write_encoder(tmp, encoder_spec, encoder_params, hf_tokenizer)
    _write_sentence_transformers_modules(tmp, encoder_spec, pooling, prompts_of(tasks))
    _write_heads(tmp, head_params)
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    meta = {
        "format": EXPORT_FORMAT,
        "tasks": [t.export_meta() for t in tasks],
        "pooling": pooling,
        "normalize": encoder_spec.normalize,
        "max_length": encoder_spec.max_length,
        "files": {f: _sha256(tmp / f) for f in files},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    verify_export(tmp)  # complete and intact before it replaces anything


def _swap_in(new: Path, folder: Path) -> None:
    """``new`` becomes ``folder`` atomically: a reader (or a crash) sees the old export or the new
    one, never neither. Linux exchanges the two folders in one ``renameat2(RENAME_EXCHANGE)``;
    elsewhere the old one is renamed aside first (a crash between the two renames leaves it as
    ``<folder>.old``)."""
    if not folder.exists():
        new.rename(folder)
        return
    if _exchange(new, folder):
        shutil.rmtree(new)  # (now the old export)
        return
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return done


def _write_encoder(folder: Path, encoder_spec, encoder_params, hf_tokenizer) -> None:
    """The encoder as a Hugging Face checkpoint (config, safetensors weights, tokenizer): BERT where it
    has a token-type embedding, else DistilBERT."""
    from safetensors.numpy import save_file

    from mtl_jax.model.encoder import type_count
    from mtl_jax.model.pretrained import bert_config, distilbert_to_bert_state, flax_to_torch_state

    state = flax_to_torch_state(jax.device_get(encoder_params))
    if type_count(encoder_spec.config) > 1:
        config, state = bert_config(encoder_spec.config), distilbert_to_bert_state(state)
    else:
        config = encoder_spec.config.to_dict() | {"model_type": "distilbert", "architectures": ["DistilBertModel"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, str(folder / "model.safetensors"))
    hf_tokenizer.save_pretrained(str(folder))
    tok_config = folder / "tokenizer_config.json"
    inputs = {"model_input_names": MODEL_INPUT_NAMES[config["model_type"]]}
    tok_config.write_text(json.dumps(json.loads(tok_config.read_text()) | inputs, indent=2))


def _write_sentence_transformers_modules(folder: Path, encoder_spec, pooling: str, prompts: dict) -> None:
    """modules.json, the pooling (and normalisation) module, sentence_bert_config.json and
    config_sentence_transformers.json (the tasks' prompts by column name: ``encode(prompt_name=...)``)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder_spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir()
    pooling_config = {
        "word_embedding_dimension": encoder_spec.config.dim,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": encoder_spec.max_length, "do_lower_case": encoder_spec.lowercase})
    )
    settings = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings, indent=2))


def _write_heads(folder: Path, head_params: dict) -> None:
    """heads.safetensors: ``<task>.kernel`` and ``<task>.bias``."""
    from safetensors.numpy import save_file

    heads = {
        f"{t}.{k}": np.asarray(v, np.float32) for t, p in jax.device_get(head_params).items() for k, v in p.items()
    }
    save_file(heads, str(folder / "heads.safetensors"))


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
