"""mtl_jax: multi-task fine-tuning of a sentence transformer in JAX/Flax."""

from mtl_jax.errors import MtlError
from mtl_jax.inference import Predictor, SentenceEncoder, load, load_encoder
from mtl_jax.model.multitask import MultiTaskModel

__all__ = ["MtlError", "MultiTaskModel", "Predictor", "SentenceEncoder", "load", "load_encoder"]
__version__ = "0.2.0"
