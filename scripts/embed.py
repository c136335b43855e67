#!/usr/bin/env python
"""`python scripts/embed.py --help`, the same program as the `mtl-embed` command: mtl_jax/commands/embed.py."""

from mtl_jax.commands.embed import run

if __name__ == "__main__":
    run()
