"""The encoder module keeps FlaxDistilBertModule's parameter tree, so checkpoints load unchanged."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util
from transformers import DistilBertConfig
from transformers.models.distilbert.modeling_flax_distilbert import FlaxDistilBertModule

from mtl_jax.encoder import Encoder


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_parameter_tree_is_exactly_flax_distilbert_modules(sinusoidal):
    config = DistilBertConfig(
        vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64, sinusoidal_pos_embds=sinusoidal
    )
    ids = np.ones((1, 8), np.int32)
    theirs = jax.eval_shape(FlaxDistilBertModule(config).init, jax.random.PRNGKey(0), ids, ids)["params"]
    ours = jax.eval_shape(Encoder(config).init, jax.random.PRNGKey(0), ids, np.zeros_like(ids), ids)["params"]
    flat = lambda tree: {k: (v.shape, v.dtype) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}  # noqa: E731
    assert flat(ours) == flat(theirs)
