"""Resolve a pretrained encoder (embedded, local directory, Hugging Face cache) and
convert its weights into ``FlaxDistilBertModule`` parameters.

BERT checkpoints are converted exactly: DistilBERT's block is BERT's block under
other names, and BERT's token-type row 0 (every token of a single sentence has type 0)
is folded into the position embeddings; the other rows are kept beside DistilBERT's tree
as offsets from row 0 (``type_offsets``, ``config.type_vocab_size``), so the second text of
a cross-encoded pair gets row 1, as in BERT (see ``mtl_jax.model.encoder.token_types``).
Weights are read from safetensors or Flax msgpack; pickle files are refused unless the
caller opts in, since unpickling can run code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.data.assets import EMBEDDED_MODEL_NAMES, embedded_model_dir
from mtl_jax.errors import MtlError
from mtl_jax.model.encoder import type_count

POOLING_MODES = ("cls", "mean", "max")
PICKLE_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt", "pytorch_model.pt")
_LN_EPS = 1e-12  # FlaxDistilBert hard-codes this LayerNorm epsilon


@dataclass(frozen=True)
class EncoderSpec:
    """Everything about a pretrained encoder except its weights and tokenizer."""

    config: DistilBertConfig
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 512
    lowercase: bool = False
    prompts: tuple[tuple[str, str], ...] = ()  # sentence-transformers' prompts: (name, text)


# ---------------------------------------------------------------------------- locating


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local directory with the checkpoint: embedded model, a path, or the HF cache/hub."""
    name = str(name_or_path)
    if name in EMBEDDED_MODEL_NAMES:
        return embedded_model_dir()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MtlError(f"{path}: not a directory (pass the folder that holds config.json and the weights)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise MtlError(f"{path}: no such directory")
    return _hub_snapshot(name)


def _hub_snapshot(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.msgpack", "*.model", "1_Pooling/*"],
        )
    except Exception as e:  # no network, unknown repo, gated repo: all end here
        raise MtlError(
            f"{name}: not a local directory and not available from the Hugging Face cache or hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            f"download it elsewhere and pass the local directory, or use the embedded "
            f"'{EMBEDDED_MODEL_NAMES[0]}'"
        ) from None
    return Path(folder)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MtlError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MtlError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise MtlError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise MtlError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------- config


def distilbert_config(raw: dict, config_path: Path) -> DistilBertConfig:
    """A DistilBertConfig from a ``config.json`` of model_type bert or distilbert, or a refusal."""
    model_type = raw.get("model_type")
    if model_type == "distilbert":
        cfg = DistilBertConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
        if cfg.activation != "gelu":
            raise MtlError(f"{config_path}: activation {cfg.activation!r} is unsupported (only 'gelu')")
        return cfg
    if model_type != "bert":
        raise MtlError(f"{config_path}: model_type {model_type!r} is unsupported (supported: 'bert', 'distilbert')")
    problems = []
    if raw.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {raw['position_embedding_type']!r} (only 'absolute')")
    if raw.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (only 'gelu')")
    if abs(float(raw.get("layer_norm_eps", _LN_EPS)) - _LN_EPS) > 1e-15:
        problems.append(f"layer_norm_eps {raw['layer_norm_eps']} (DistilBERT uses {_LN_EPS})")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        problems.append("decoder / cross-attention layers")
    if problems:
        raise MtlError(f"{config_path}: unsupported BERT variant: " + "; ".join(problems))
    try:
        return DistilBertConfig(
            vocab_size=raw["vocab_size"],
            max_position_embeddings=raw.get("max_position_embeddings", 512),
            sinusoidal_pos_embds=False,
            n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"],
            dim=raw["hidden_size"],
            hidden_dim=raw["intermediate_size"],
            dropout=raw.get("hidden_dropout_prob", 0.1),
            attention_dropout=raw.get("attention_probs_dropout_prob", 0.1),
            activation="gelu",
            initializer_range=raw.get("initializer_range", 0.02),
            pad_token_id=raw.get("pad_token_id", 0),
            type_vocab_size=int(raw.get("type_vocab_size", 2)),  # (BertConfig's default; see encoder.Embeddings)
        )
    except KeyError as e:
        raise MtlError(f"{config_path}: missing key {e.args[0]!r}") from None


# ---------------------------------------------------------------------------- weights

_BERT_LAYER = [
    ("attention.self.query", "attention.q_lin"),
    ("attention.self.key", "attention.k_lin"),
    ("attention.self.value", "attention.v_lin"),
    ("attention.output.dense", "attention.out_lin"),
    ("attention.output.LayerNorm", "sa_layer_norm"),
    ("intermediate.dense", "ffn.lin1"),
    ("output.dense", "ffn.lin2"),
    ("output.LayerNorm", "output_layer_norm"),
]


def _strip_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    if any(k.startswith(prefix + ".") for k in state):
        return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return state


def bert_to_distilbert_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch-named BERT weights -> PyTorch-named DistilBERT weights, BERT's token-type row 0 folded
    into the positions and its other rows as offsets from row 0 (``type_offsets``; exact; pooler dropped)."""
    state = _strip_prefix(state, "bert")
    state = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            for src, dst in _BERT_LAYER:
                if m.group(2) == src:
                    out[f"transformer.layer.{m.group(1)}.{dst}.{m.group(3)}"] = v
        elif k.startswith("embeddings.") and "token_type" not in k and "position_ids" not in k:
            out[k] = v
    types = state.get("embeddings.token_type_embeddings.weight")
    if types is not None and "embeddings.position_embeddings.weight" in out:
        # single sentences have token_type_ids == 0: row 0 is added to every position
        out["embeddings.position_embeddings.weight"] = out["embeddings.position_embeddings.weight"] + types[0][None, :]
        if len(types) > 1:
            out["type_offsets.weight"] = types[1:] - types[0][None, :]
    return out


def distilbert_to_bert_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`bert_to_distilbert_state` (no pooler; row 0 of the token types stays in the
    positions, as zeros in its own row): what an export with token types writes, so that BERT's
    loaders feed it ``token_type_ids``."""
    out = {}
    for k, v in state.items():
        m = re.match(r"transformer\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            src = next(src for src, dst in _BERT_LAYER if dst == m.group(2))
            out[f"encoder.layer.{m.group(1)}.{src}.{m.group(3)}"] = v
        elif k == "type_offsets.weight":
            out["embeddings.token_type_embeddings.weight"] = np.concatenate([np.zeros_like(v[:1]), v])
        else:
            out[k] = v
    return out


def bert_config(config: DistilBertConfig) -> dict:
    """``config.json`` of the BERT model that :func:`distilbert_config` reads back as ``config``."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": config.hidden_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": config.initializer_range,
        "layer_norm_eps": _LN_EPS,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
    }


def torch_state_to_flax(state: dict[str, np.ndarray]) -> dict:
    """PyTorch-named DistilBERT weights -> nested FlaxDistilBertModule params (Dense kernels transposed)."""
    state = _strip_prefix(state, "distilbert")
    flat = {}
    for k, v in state.items():
        if not k.startswith(("embeddings.", "transformer.layer.", "type_offsets.")):
            continue  # task heads, MLM projector, pre_classifier: not part of the encoder
        parts = k.split(".")
        module, leaf = parts[:-1], parts[-1]
        if leaf == "bias":
            flat[(*module, "bias")] = v
        elif module[-1].endswith("embeddings") or module[-1] == "type_offsets":
            flat[(*module, "embedding")] = v
        elif "LayerNorm" in module[-1] or module[-1].endswith("layer_norm"):
            flat[(*module, "scale")] = v
        else:
            flat[(*module, "kernel")] = v.T
    return traverse_util.unflatten_dict(flat)


def flax_to_torch_state(params: dict) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_state_to_flax`: nested Flax params -> PyTorch-named arrays."""
    out = {}
    for path, v in traverse_util.flatten_dict(params).items():
        *module, leaf = path
        v = np.asarray(v)
        name = ".".join(module)
        if leaf == "kernel":
            out[f"{name}.weight"] = np.ascontiguousarray(v.T)
        elif leaf in ("embedding", "scale"):
            out[f"{name}.weight"] = v
        else:
            out[f"{name}.{leaf}"] = v
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(jnp.asarray(f.get_tensor(k), dtype=jnp.float32))
        return out
    except Exception as e:
        raise MtlError(f"{path}: not a readable safetensors file ({e})") from None


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """Flax msgpack params, flattened to PyTorch names so one conversion path serves both."""
    from flax.serialization import msgpack_restore

    try:
        tree = msgpack_restore(path.read_bytes())
    except Exception as e:
        raise MtlError(f"{path}: not a readable Flax msgpack file ({e})") from None
    out = {}
    for k, v in flax_to_torch_state(tree).items():
        out[k] = np.asarray(v, dtype=np.float32)
    return out


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise MtlError(f"{path}: reading a pickle checkpoint needs PyTorch, which is not installed") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise MtlError(f"{path}: cannot load ({e})") from None
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def read_weights(folder: Path, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], Path]:
    """PyTorch-named float32 arrays from the checkpoint's weight file, and that file's path."""
    single = folder / "model.safetensors"
    if single.is_file():
        return _read_safetensors(single), single
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise MtlError(f"{index}: empty weight_map")
        state = {}
        for shard in shards:
            state.update(_read_safetensors(folder / shard))
        return state, index
    msgpack = folder / "flax_model.msgpack"
    if msgpack.is_file():
        return _read_msgpack(msgpack), msgpack
    pickles = [folder / n for n in PICKLE_FILES if (folder / n).is_file()]
    if pickles:
        if not allow_pickle:
            raise MtlError(
                f"{pickles[0]}: pickle checkpoints can run arbitrary code when loaded and are refused; "
                f"convert it to model.safetensors, or pass allow_pickle=True if you trust its source"
            )
        return _read_pickle(pickles[0]), pickles[0]
    raise MtlError(f"{folder}: no weights found (expected model.safetensors or flax_model.msgpack)")


def expected_shapes(config: DistilBertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter shapes of a FlaxDistilBertModule with ``config``, computed without allocating."""
    module = FlaxDistilBertModule(config)
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids))["params"]
    out = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
    if type_count(config) > 1:
        out["type_offsets", "embedding"] = (type_count(config) - 1, config.dim)
    return out


def check_params(params: dict, config: DistilBertConfig, source: Path) -> dict:
    """``params`` as float32 jax arrays, after checking every name and shape against ``config``."""
    want = expected_shapes(config)
    have = traverse_util.flatten_dict(params)
    missing = sorted(".".join(k) for k in want if k not in have)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MtlError(f"{source}: missing weights {', '.join(missing[:3])}{more} for config.json")
    for k, shape in want.items():
        if tuple(have[k].shape) != shape:
            raise MtlError(
                f"{source}: weight {'.'.join(k)} has shape {tuple(have[k].shape)}, config.json implies {shape}"
            )
    return traverse_util.unflatten_dict({k: jnp.asarray(have[k], jnp.float32) for k in want})


# ---------------------------------------------------------------------------- loading


def _sentence_transformers_settings(folder: Path, spec: dict) -> tuple[Path, dict]:
    """Pooling / normalize / max length / lowercase from a sentence-transformers layout, if present."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return folder, spec
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MtlError(f"{modules_file}: cannot read ({e})") from None
    model_dir = folder
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / m.get("path", "")
        if kind == "Transformer" and m.get("path"):
            model_dir = sub
        elif kind == "Pooling":
            cfg = _read_json(sub / "config.json")
            modes = [
                p
                for p in POOLING_MODES
                if cfg.get(f"pooling_mode_{p}_token" if p == "cls" else f"pooling_mode_{p}_tokens")
            ]
            mode = cfg.get("pooling_mode")
            if mode in POOLING_MODES:
                modes = [mode]
            if cfg.get("pooling_mode_mean_sqrt_len_tokens") or len(modes) != 1:
                raise MtlError(
                    f"{sub / 'config.json'}: unsupported pooling configuration (need exactly one of cls/mean/max)"
                )
            spec["pooling"] = modes[0]
        elif kind == "Normalize":
            spec["normalize"] = True
    sbert = model_dir / "sentence_bert_config.json"
    if not sbert.is_file():
        sbert = folder / "sentence_bert_config.json"
    if sbert.is_file():
        cfg = _read_json(sbert)
        if cfg.get("max_seq_length"):
            spec["max_length"] = int(cfg["max_seq_length"])
        spec["lowercase"] = bool(cfg.get("do_lower_case", False))
    settings = folder / "config_sentence_transformers.json"
    if settings.is_file():
        prompts = _read_json(settings).get("prompts") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
            raise MtlError(f"{settings}: prompts must map names to texts")
        spec["prompts"] = tuple(prompts.items())
    return model_dir, spec


def load_hf_tokenizer(folder: Path):
    """The checkpoint's fast tokenizer (tokenizer.json, or built from vocab.txt)."""
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as e:
        raise MtlError(f"{folder}: no usable tokenizer files (tokenizer.json or vocab.txt): {e}") from None
    if not tok.is_fast:
        raise MtlError(f"{folder}: only a slow tokenizer is available; a fast tokenizer (tokenizer.json) is needed")
    return tok


def load_pretrained(name_or_path: str | Path, allow_pickle: bool = False):
    """(EncoderSpec, encoder params, HF fast tokenizer, model directory) for a name or path."""
    folder = resolve_model_dir(name_or_path)
    spec_kw: dict = {}
    model_dir, spec_kw = _sentence_transformers_settings(folder, spec_kw)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise MtlError(f"{config_path}: no config.json: not a Hugging Face checkpoint directory")
    raw = _read_json(config_path)
    config = distilbert_config(raw, config_path)
    state, weights_path = read_weights(model_dir, allow_pickle=allow_pickle)
    if raw.get("model_type") == "bert":
        state = bert_to_distilbert_state(state)
    params = check_params(torch_state_to_flax(state), config, weights_path)
    tokenizer = load_hf_tokenizer(model_dir)
    if type_count(config) > 1:  # the token that ends a pair's first text (see mtl_jax.model.encoder.token_types)
        config.sep_token_id = tokenizer.sep_token_id
    limit = config.max_position_embeddings
    tok_max = getattr(tokenizer, "model_max_length", limit) or limit
    spec_kw.setdefault("max_length", min(limit, tok_max if tok_max < 10**6 else limit))
    if spec_kw["max_length"] > limit:
        raise MtlError(f"{config_path}: max_seq_length {spec_kw['max_length']} exceeds max_position_embeddings {limit}")
    return EncoderSpec(config=config, **spec_kw), params, tokenizer, model_dir
