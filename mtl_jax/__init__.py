"""mtl_jax: multi-task fine-tuning of a sentence transformer in JAX/Flax.

The names below load on first use, so importing the package, or a submodule that needs neither,
imports neither JAX nor the model.
"""

from __future__ import annotations

import importlib

from mtl_jax.errors import MtlError

_LAZY = {
    "Predictor": "mtl_jax.inference",
    "SentenceEncoder": "mtl_jax.inference",
    "load": "mtl_jax.inference",
    "load_encoder": "mtl_jax.inference",
    "MultiTaskModel": "mtl_jax.model.multitask",
}

__all__ = ["MtlError", "MultiTaskModel", "Predictor", "SentenceEncoder", "load", "load_encoder"]
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtl_jax' has no attribute {name!r}")
