"""Prepare a run's data ahead: read, check and tokenize every task's files once into the data cache,
where a training run with the same data and settings finds it (for example on a CPU host before a
GPU or TPU job).

    python scripts/prepare.py --config my.yaml              # then: python scripts/train.py --config my.yaml
    python scripts/prepare.py --config my.yaml --data-cache /shared/cache

Takes the training options (the ones that matter: the tasks, --encoder's tokenizer, --max-length,
--split-seed / --seed, --skip-bad-rows, --data-cache); prints the store's folder and its counts.
Exit status 2 on bad input, with one message per problem.
"""

from __future__ import annotations

import sys

from mtl_jax.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    from mtl_jax.cli import parse_config
    from mtl_jax.config import config_class
    from mtl_jax.data.store import prepare
    from mtl_jax.errors import MtlError
    from mtl_jax.inference import load_encoder
    from mtl_jax.training.run import run_data_key

    cfg = parse_config(config_class(), sys.argv[1:] if argv is None else argv, __doc__)
    if cfg.data_cache == "off":
        raise MtlError("--data-cache off: there is nowhere to prepare the data into")
    cfg.check()
    encoder = load_encoder(cfg.encoder)
    key = run_data_key(cfg, encoder)
    data = prepare(
        cfg.selected_tasks(), encoder.tokenizer, key, cfg.data_cache, log=lambda m: print(m, file=sys.stderr)
    )
    for note in data.notes:
        print(note, file=sys.stderr)
    counts = ", ".join(f"{s} {len(d)}" for s, d in data.splits.items())
    print(f"{data.folder}: {counts} examples ({'reused' if data.reused else 'prepared now'})")
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
