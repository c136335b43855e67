"""Writing a large store in a child Python process (``python -m mtl_jax.data.apart_main``).

A training process keeps the memory it frees (no ``mmap``, a 2 GiB trim threshold:
:mod:`mtl_jax.training.hostmem`), so what reading and tokenizing a large input freed would stay
with it for the whole run. The child starts with glibc's defaults, and what it held goes back to
the system when it exits; the trainer then maps the finished store.
A child costs a second or two to start, so inputs under :data:`APART_BYTES` are prepared in the
process itself.

Bad input stops the child with the same message (file, line, reason) the process itself would
give, raised again here as :class:`~mtl_jax.errors.MtlError`; a child that dies leaves no store
(:func:`~mtl_jax.data.store.write_store` writes beside and renames).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

from mtl_jax.errors import MtlError

APART_BYTES = 32 << 20  # input files of this many bytes and more are prepared in a child process
BAD_INPUT = 2  # the child's exit status when it stops on bad input (its message on stdout)


def write_store_apart(store: Path, tasks, tokenizer, key) -> None:
    """:func:`~mtl_jax.data.store.write_store` in a child process with glibc's default malloc."""
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the mtl_jax package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    request = pickle.dumps((store, tuple(tasks), tokenizer, key))
    done = subprocess.run(
        [sys.executable, "-m", "mtl_jax.data.apart_main"], input=request, stdout=subprocess.PIPE, env=env, check=False
    )
    if done.returncode == BAD_INPUT:
        raise MtlError(done.stdout.decode("utf-8", "replace").strip())
    if done.returncode != 0:
        raise MtlError(
            f"{store}: preparing the data stopped in its child process (exit status {done.returncode}); "
            "the lines above say why"
        )
