"""Measure the freezing scenarios (and, with --weighting, the loss-weighting methods) against each other.

    python scripts/compare.py                         # embedded default: 7 scenarios x 3 seeds, <= 60 min
    python scripts/compare.py --config my.yaml --seeds 0 1 --budget-minutes 20 --weighting

One run per (scenario, seed), each with the options of scripts/train.py (--epochs
defaults to 1 here). Writes results.csv, results.md and results.png into --out.
"""

from __future__ import annotations

import sys

from mtl_jax.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    from mtl_jax.cli import parse_config
    from mtl_jax.outputs.compare import CompareConfig, compare

    compare(parse_config(CompareConfig, sys.argv[1:] if argv is None else argv, __doc__))
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
