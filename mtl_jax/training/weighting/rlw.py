"""``rlw``: Random Loss Weighting, Lin et al. (2021): ``w = softmax(eps)``, ``eps ~ N(0, I)``
drawn anew every step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtl_jax.training.weighting.base import Method, register


@register("rlw")
@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomWeights(Method):
    """A softmax of standard normal draws, new at every step."""

    about = "random weights (Lin et al. 2021)"

    def weights(self, state, losses, present, key):
        w = jax.nn.softmax(jax.random.normal(key, losses.shape))
        return w, jnp.sum(w * losses), state
