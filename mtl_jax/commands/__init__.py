"""The command-line programs: scripts/*.py and the mtl-* console scripts run these.

Importing the package keeps XLA:CPU's scratch memory between a training process's steps
(mtl_jax/training/hostmem.py), before JAX's first computation.
"""

from mtl_jax.training.hostmem import reuse_host_memory

reuse_host_memory()
