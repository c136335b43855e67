"""Data parallelism through ``jax.sharding``: one mesh axis ``data`` over every device.

Batches are split along ``data``; parameters and optimizer state are replicated.
XLA (GSPMD) inserts the gradient all-reduce, so the train step is the same code on
one device or many, in one process or several (``jax.distributed``); with one device
the mesh is trivial. In a multi-process run every process plans the same global
batch (the plan is a pure function of the seed) and hands JAX only its own rows.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_jax.data.batching import own_rows
from mtl_jax.errors import MtlError


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a multi-process run; returns whether one was joined.

    ``coordinator`` is process 0's ``host:port`` (else ``$JAX_COORDINATOR_ADDRESS``), with
    ``num_processes`` / ``process_id`` (else ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``);
    ``"auto"`` lets JAX detect the cluster (Cloud TPU VM slices, SLURM, Open MPI). Must run
    before anything else touches JAX. CPU processes talk through gloo.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
        return True
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if num_processes is None or process_id is None:
        raise MtlError(
            f"coordinator {coordinator}: also give --num-processes and --process-id "
            "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise MtlError(f"${name}={value!r}: expected an integer") from None


def is_primary() -> bool:
    """Process 0 writes logs, plots, metrics and exports."""
    return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def check_batch_size(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise MtlError(f"{flag} {batch_size} does not divide by the {n} devices; use {options}")


def _put(tree, sharding_of):
    """Place each leaf with ``sharding_of(leaf)``, in one process or several."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(x, sharding_of(x)), tree)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding_of(x), lambda i: np.asarray(x)[i]), tree
    )


def replicate(tree, mesh: Mesh):
    """Every device holds the whole ``tree``."""
    sharding = NamedSharding(mesh, P())
    return _put(tree, lambda _: sharding)


def fsdp_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """FSDP-style: the largest axis that divides by the device count is split over ``data``.

    Arrays with no such axis (biases of odd sizes, scalars) stay replicated.
    """
    n = mesh.devices.size
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] >= n and shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def place_state(tree, mesh: Mesh, fsdp: bool = False):
    """Parameters and optimizer state on the mesh: replicated, or (``fsdp``) split over ``data``.

    With ``fsdp`` each device holds 1/n of every large array; XLA gathers what a step
    needs, so the train step itself does not change.
    """
    if not fsdp:
        return replicate(tree, mesh)
    return _put(tree, lambda x: fsdp_sharding(np.shape(x), mesh))


def shard_batch(batch, mesh: Mesh):
    """Split the leading (batch) axis of each array of ``batch`` (a pytree, the whole global batch)
    over the ``data`` axis; with several processes each contributes its own block of rows."""
    return shard_local(own_rows(batch, jax.process_index(), jax.process_count()), mesh)


def shard_local(batch, mesh: Mesh):
    """This process's block of rows (:func:`own_rows`) of a global batch as the batch-sharded global
    arrays: each process passes only what it built."""
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.tree.map(lambda v: jax.device_put(v, sharding), batch)
    n = jax.process_count()
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(sharding, v, (len(v) * n, *v.shape[1:])), batch
    )


def to_host(tree):
    """A (possibly batch-sharded, multi-process) result as numpy arrays, whole on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
