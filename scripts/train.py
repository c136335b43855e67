#!/usr/bin/env python
"""`python scripts/train.py --help`, the same program as the `mtl-train` command: mtl_jax/commands/train.py."""

from mtl_jax.commands.train import run

if __name__ == "__main__":
    run()
