"""Predict every task's label for sentences with a trained model (<run>/export).

    python scripts/predict.py --model runs/default/export "What a fine film." "We will cut taxes."
    python scripts/predict.py --model runs/default/export --input reviews.csv --text-column text
    cat sentences.txt | python scripts/predict.py --model runs/default/export --format table

Input: sentences as arguments, --input FILE (.txt: one per line; .csv/.tsv/.jsonl with
--text-column), or stdin (one per line). Output: JSON lines
{"text": ..., "<task>": {"label": ..., "probs": {...}}, ...} or a table for people.
Errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtl_jax.cli import read_lines, run_cli
from mtl_jax.errors import MtlError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences (else --input, else stdin)")
    p.add_argument("--model", required=True, help="exported model directory (<run>/export)")
    p.add_argument("--input", help="file: .txt one sentence per line, or .csv/.tsv/.jsonl with --text-column")
    p.add_argument("--text-column", default="text", help="column / field holding the text (default: %(default)s)")
    p.add_argument("--format", choices=["jsonl", "table"], default="jsonl", help="output format (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p.parse_args(argv)


def read_input(path: str | None, text_column: str) -> list[str]:
    if path is None:
        return read_lines(None)
    p = Path(path)
    if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".gz", ".bz2"):
        from mtl_jax.data.load import read_rows

        rows = read_rows(p, [text_column])
        bad = [r for r in rows if r.problem or r.fields.get(text_column) is None]
        if bad:
            r = bad[0]
            raise MtlError(f"{p}:{r.line}: {r.problem or f'no field {text_column!r}'}")
        return [r.fields[text_column] for r in rows]
    return read_lines(path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sentences and args.input:
        raise MtlError("give sentences as arguments or --input, not both")
    texts = args.sentences or read_input(args.input, args.text_column)
    from mtl_jax import load

    predictor = load(args.model)
    rows = predictor.predict(texts, batch_size=args.batch_size, progress=False if args.no_progress else None)
    if args.format == "jsonl":
        for text, row in zip(texts, rows):
            out = {"text": text} | {t: {"label": p.label, "probs": p.probs} for t, p in row.items()}
            print(json.dumps(out, ensure_ascii=False))
    else:
        names = [t for t, _ in predictor.tasks]
        width = min(60, max([len(t) for t in texts] + [4]))
        print("text".ljust(width) + "".join(f"  {t:<24}" for t in names))
        for text, row in zip(texts, rows):
            short = text if len(text) <= width else text[: width - 1] + "…"
            cells = "".join(f"  {row[t].label + f' ({row[t].probs[row[t].label]:.2f})':<24}" for t in names)
            print(short.ljust(width) + cells)
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
