"""How the per-task losses become one update: ``--loss-weighting``.

Each method is a small frozen object found through :data:`REGISTRY` by its name, with a
NamedTuple state (``init``) that lives in the train state and is checkpointed with it.
The train step asks a method what it needs instead of naming it:

- ``every_task``: every step holds every task (task-stacked batches, arrays ``[rows, T, ...]``);
- ``uses_task_grads``: it combines per-task gradients (:meth:`Method.combine`) instead of
  weighting the losses between one forward and one backward pass (:meth:`Method.weights`);
- ``weights_from_losses``: its weights depend on this batch's losses, so under gradient
  accumulation a forward pass over the micro-batches comes first.

Loss methods (``loss.py``, ``dwa.py``, ``rlw.py``, ``famo.py``): ``sum``, ``static``, ``uncertainty``,
``rlw``, ``dwa``, ``famo``. Gradient methods (``gradient.py``): ``pcgrad``, ``mgda``,
``cagrad``, ``gradnorm``. A new method is a new module with a registered class; its options are
its fields (see :mod:`mtl_jax.training.weighting.base`).
"""

# ruff: noqa: I001  (the modules register their methods in this order, which the error messages and compare.py follow)
from mtl_jax.training.weighting import loss  # noqa: F401
from mtl_jax.training.weighting import dwa  # noqa: F401
from mtl_jax.training.weighting import rlw  # noqa: F401
from mtl_jax.training.weighting import famo  # noqa: F401
from mtl_jax.training.weighting import gradient  # noqa: F401

from mtl_jax.training.weighting.base import REGISTRY, Method, NoState, flat_options, make, mean_losses, register
from mtl_jax.training.weighting.gradient import cosine_matrix, gram_matrix, pcgrad
from mtl_jax.training.weighting.loss import uncertainty_terms


__all__ = [
    "REGISTRY",
    "Method",
    "NoState",
    "cosine_matrix",
    "flat_options",
    "gram_matrix",
    "make",
    "mean_losses",
    "pcgrad",
    "register",
    "uncertainty_terms",
]
