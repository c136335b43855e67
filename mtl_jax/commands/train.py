"""Fine-tune the shared sentence encoder on every task at once.

    python scripts/train.py                      # embedded default: 2 tasks, all-MiniLM-L6-v2
    python scripts/train.py --config my.yaml --epochs 2 --freeze backbone

Options come from mtl_jax.config.TrainConfig; a --config file sets defaults that
other flags override. Exit status 2 on bad input, with one message per problem.
"""

from __future__ import annotations

import sys

from mtl_jax.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    from mtl_jax.cli import parse_config
    from mtl_jax.config import config_class
    from mtl_jax.training.trainer import train_and_evaluate

    cfg = parse_config(config_class(), sys.argv[1:] if argv is None else argv, __doc__)
    train_and_evaluate(cfg)
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
