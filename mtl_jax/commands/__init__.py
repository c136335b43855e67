"""The command-line programs: scripts/*.py and the mtl-* console scripts run these.

Importing the package tunes glibc's malloc for a training process (mtl_jax/training/hostmem.py)
before anything starts a thread: NumPy's import does.
"""

from mtl_jax.training.hostmem import reuse_host_memory

reuse_host_memory()
