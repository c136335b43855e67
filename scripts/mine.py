#!/usr/bin/env python
"""`python scripts/mine.py --help`, the same program as the `mtl-mine` command: mtl_jax/commands/mine.py."""

from mtl_jax.commands.mine import run

if __name__ == "__main__":
    run()
