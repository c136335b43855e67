#!/usr/bin/env python
"""Fine-tune the shared sentence encoder on every task at once.

    python scripts/train.py                      # embedded default: 2 tasks, all-MiniLM-L6-v2
    python scripts/train.py --config my.yaml --epochs 2 --freeze backbone

Options come from mtl_jax.config.TrainConfig; a --config file sets defaults that
other flags override. Exit status 2 on bad input, with one message per problem.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtl_jax.cli import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from mtl_jax.config import TrainConfig, load_config_file
    from mtl_jax.run import train_and_evaluate
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    defaults = TrainConfig()
    config_file = _config_arg(argv)
    if config_file:
        defaults = dataclasses.replace(defaults, config=config_file, **load_config_file(config_file))
    cfg = tyro.cli(TrainConfig, default=defaults, args=argv, description=__doc__)
    train_and_evaluate(cfg)
    return 0


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main))
