"""Task types: what each kind of task reads, how its head is trained and scored, and what it
predicts. ``REGISTRY`` maps a task's ``type`` to its class (see :mod:`mtl_jax.tasks.base`)."""

from mtl_jax.tasks import (  # noqa: F401  (each registers its type)
    classification,
    multilabel,
    pair,
    regression,
    retrieval,
    similarity,
    tagging,
)
from mtl_jax.tasks.base import REGISTRY, Task, build, from_export, known_keys, register
from mtl_jax.tasks.config import TaskConfig

__all__ = ["REGISTRY", "Task", "TaskConfig", "build", "from_export", "known_keys", "register"]
