#!/usr/bin/env python
"""`python scripts/prepare.py --help`, the same program as the `mtl-prepare` command: mtl_jax/commands/prepare.py."""

from mtl_jax.commands.prepare import run

if __name__ == "__main__":
    run()
