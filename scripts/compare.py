#!/usr/bin/env python
"""`python scripts/compare.py --help`, the same program as the `mtl-compare` command: mtl_jax/commands/compare.py."""

from mtl_jax.commands.compare import run

if __name__ == "__main__":
    run()
