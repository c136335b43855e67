"""Mine hard negatives for (query, positive) pairs with a sentence encoder.

    python scripts/mine.py --input pairs.jsonl --out mined.jsonl
    python scripts/mine.py --input pairs.csv --query-column question --positive-column answer \\
        --corpus passages.txt --negatives 5 --range-max 50 --out mined.csv
    python scripts/mine.py --model runs/qa/export --input pairs.jsonl --out mined.jsonl

Each query is ranked against the corpus (--corpus: a text file, one passage a line, or a data file
with --corpus-column; default: the pairs' distinct positives). Of the candidates that are not one
of the query's positives, ranks --range-min to --range-max are considered, best first, and taken
while a candidate scores at most --max-ratio times the row's positive (TopK-PercPos, default 0.95;
--max-ratio off to turn it off) and, with --margin M, at most the positive's score minus M.

Output by the suffix of --out: .jsonl rows {query, positive, "negatives": [...]} (train with
`negatives_column: negatives`), or .csv / .tsv with columns negative_1 ... negative_k (train with
`text_columns: [query, positive, negative_1, ...]`); a row that found fewer negatives has fewer
(empty cells). Errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from mtl_jax.cli import add_dtype_option, read_input, run_cli
from mtl_jax.errors import MtlError
from mtl_jax.inference import load_encoder
from mtl_jax.mining import MineSettings, mine

OUTPUTS = (".jsonl", ".csv", ".tsv")


def ratio(text: str) -> float | None:
    """``--max-ratio``'s value: a number, or ``off``."""
    if text.strip().lower() == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or off") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the (query, positive) pairs: .csv/.tsv/.jsonl/.parquet")
    p.add_argument("--query-column", default="query", help="default: %(default)s")
    p.add_argument("--positive-column", default="positive", help="default: %(default)s")
    p.add_argument("--corpus", help="passages to mine from (default: the pairs' distinct positives)")
    p.add_argument("--corpus-column", default="text", help="with a data file as --corpus (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"the file to write ({', '.join(OUTPUTS)})")
    p.add_argument(
        "--model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="embedded model name, checkpoint directory or an export (<run>/export) (default: %(default)s)",
    )
    defaults = MineSettings()
    p.add_argument("--negatives", type=int, default=defaults.negatives, help="per row at most (default: %(default)s)")
    p.add_argument(
        "--range-min", type=int, default=defaults.range_min, help="first rank considered (default: %(default)s)"
    )
    p.add_argument(
        "--range-max", type=int, default=defaults.range_max, help="ranks below it considered (default: %(default)s)"
    )
    p.add_argument(
        "--max-ratio",
        type=ratio,
        default=defaults.max_ratio,
        help="a negative scores at most this times the positive (TopK-PercPos), or off (default: %(default)s)",
    )
    p.add_argument("--margin", type=float, help="a negative scores at most the positive's score minus this")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per encoding batch (default: %(default)s)")
    p.add_argument("--max-length", type=int, help="tokens per text (default: the checkpoint's)")
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p.parse_args(argv)


def write_mined(path: Path, columns: tuple[str, str], pairs: list, negatives: list[list[str]]) -> None:
    """The pairs with their negatives, written beside ``path`` and renamed into place (never half a file)."""
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for (q, p), negs in zip(pairs, negatives):
                f.write(json.dumps({columns[0]: q, columns[1]: p, "negatives": negs}, ensure_ascii=False) + "\n")
        else:
            width = max((len(n) for n in negatives), default=0)
            out = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            out.writerow(list(columns) + [f"negative_{j + 1}" for j in range(width)])
            out.writerows([q, p] + negs + [""] * (width - len(negs)) for (q, p), negs in zip(pairs, negatives))
    os.replace(tmp, path)


def embed_all(encoder, texts: list[str], args) -> np.ndarray:
    return encoder.encode(
        texts,
        batch_size=args.batch_size,
        normalize=True,
        max_length=args.max_length,
        progress=False if args.no_progress else None,
    )


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if out.suffix.lower() not in OUTPUTS:
        raise MtlError(f"--out {out}: write {', '.join(OUTPUTS)}")
    if not out.parent.is_dir():
        raise MtlError(f"--out {out}: folder {out.parent} does not exist")
    settings = MineSettings(args.negatives, args.range_min, args.range_max, args.max_ratio, args.margin)
    settings.check()
    columns = (args.query_column, args.positive_column)
    pairs = read_input(args.input, list(columns))
    if not pairs:
        raise MtlError(f"{args.input}: no pairs")
    queries = list(dict.fromkeys(q for q, _ in pairs))
    positives = list(dict.fromkeys(p for _, p in pairs))
    corpus = list(dict.fromkeys(read_input(args.corpus, [args.corpus_column]))) if args.corpus else positives
    encoder = load_encoder(args.model, dtype=args.dtype)
    query_emb, positive_emb = embed_all(encoder, queries, args), embed_all(encoder, positives, args)
    corpus_emb = positive_emb if corpus is positives else embed_all(encoder, corpus, args)
    query_at, positive_at, corpus_at = ({t: i for i, t in enumerate(ts)} for ts in (queries, positives, corpus))
    excluded = [{corpus_at[q]} if q in corpus_at else set() for q in queries]
    for q, p in pairs:
        if p in corpus_at:
            excluded[query_at[q]].add(corpus_at[p])
    mined = mine(
        query_emb,
        positive_emb[[positive_at[p] for _, p in pairs]],
        corpus_emb,
        np.array([query_at[q] for q, _ in pairs]),
        excluded,
        settings,
        progress=False if args.no_progress else None,
    )
    write_mined(out, columns, pairs, [[corpus[j] for j in n] for n in mined.negatives])
    print(f"wrote {out}: {mined.summary(settings.negatives)}", file=sys.stderr)
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
