"""mtl_jax: multi-task fine-tuning of a sentence transformer in JAX/Flax."""

from mtl_jax.checkpoint import Predictor, load
from mtl_jax.errors import MtlError
from mtl_jax.model import MultiTaskModel, SentenceEncoder, load_encoder

__all__ = ["MtlError", "MultiTaskModel", "Predictor", "SentenceEncoder", "load", "load_encoder"]
__version__ = "0.1.0"
