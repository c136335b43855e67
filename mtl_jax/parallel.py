"""Data parallelism through ``jax.sharding``: one mesh axis ``data`` over every device.

Batches are split along ``data``; parameters and optimizer state are replicated.
XLA (GSPMD) inserts the gradient all-reduce, so the train step is the same code on
one device or many; with one device the mesh is trivial.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtl_jax.errors import MtlError


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise MtlError(f"{flag} {batch_size} does not divide by the {n} devices; use {options}")


def replicate(tree, mesh: Mesh):
    """Every device holds the whole ``tree`` (parameters, optimizer state)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Split each array's leading (batch) axis over the ``data`` axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
