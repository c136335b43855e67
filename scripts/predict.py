#!/usr/bin/env python
"""`python scripts/predict.py --help`, the same program as the `mtl-predict` command: mtl_jax/commands/predict.py."""

from mtl_jax.commands.predict import run

if __name__ == "__main__":
    run()
