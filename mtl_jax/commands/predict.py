"""Predict every task's label for sentences with a trained model (<run>/export).

    python scripts/predict.py --model runs/default/export "What a fine film." "We will cut taxes."
    python scripts/predict.py --model runs/default/export --input reviews.csv --text-column text
    cat sentences.txt | python scripts/predict.py --model runs/default/export --format table

    python scripts/predict.py --model runs/types/export --input pairs.csv --text-columns premise,hypothesis
    python scripts/predict.py --model runs/types/export --input queries.txt --corpus passages.txt --top-k 3

Input: sentences as arguments, --input FILE (.txt: one per line; .csv/.tsv/.jsonl with
--text-column, or --text-columns a,b for sentence pairs), or stdin (one per line). Each task that
takes the input answers: classification {"label", "probs"}, regression and similarity a score,
tagging a tag per word, multi-label {"labels", "probs"}, retrieval the query's embedding or, with
--corpus FILE, its --top-k best matches [{"text", "score"}].
Output: JSON lines {"text": ..., "<task>": ...} or a table for people.
Errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mtl_jax.cli import add_dtype_option, read_input, run_cli
from mtl_jax.errors import MtlError
from mtl_jax.tasks.metrics import top_k


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences (else --input, else stdin)")
    p.add_argument("--model", required=True, help="exported model directory (<run>/export)")
    p.add_argument("--input", help="file: .txt one sentence per line, or .csv/.tsv/.jsonl with --text-column")
    p.add_argument("--text-column", default="text", help="column / field holding the text (default: %(default)s)")
    p.add_argument("--text-columns", help="two columns holding sentence pairs (a,b): predicts the pair tasks")
    p.add_argument("--corpus", help="retrieval tasks: rank this file's texts (as --input reads it) for each query")
    p.add_argument("--top-k", type=int, default=5, help="with --corpus: matches per query (default: %(default)s)")
    p.add_argument("--format", choices=["jsonl", "table"], default="jsonl", help="output format (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: %(default)s)")
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p.parse_args(argv)


def with_matches(predictor, rows: list[dict], corpus: list[str], k: int, **kw) -> None:
    """Each corpus-ranking task's output becomes the query's top ``k`` corpus texts by cosine, with scores."""
    tasks = [t.name for t in predictor.task_objects if t.ranks_corpus and rows and t.name in rows[0]]
    if not tasks:
        raise MtlError("--corpus: the model has no task that ranks a corpus (retrieval)")
    passages = predictor.predict_proba(corpus, corpus=True, **kw)
    for name in tasks:
        queries = np.stack([row[name] for row in rows])
        for start, best, scores in top_k(queries, np.asarray(passages[name]), k):  # unit vectors: cosine
            for row, idx, s in zip(rows[start : start + len(best)], best, scores):
                row[name] = [{"text": corpus[j], "score": float(v)} for j, v in zip(idx, s)]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sentences and args.input:
        raise MtlError("give sentences as arguments or --input, not both")
    columns = args.text_columns.split(",") if args.text_columns else [args.text_column]
    texts = args.sentences or read_input(args.input, columns)
    from mtl_jax import load

    predictor = load(args.model, dtype=args.dtype)
    kw = dict(batch_size=args.batch_size, progress=False if args.no_progress else None)
    rows = predictor.predict(texts, **kw)
    task = {t.name: t for t in predictor.task_objects}
    if args.corpus:
        with_matches(predictor, rows, read_input(args.corpus, [args.text_column]), args.top_k, **kw)
    if args.format == "jsonl":
        for text, row in zip(texts, rows):
            out = {"text": text} | {t: task[t].output_json(p) for t, p in row.items()}
            print(json.dumps(out, ensure_ascii=False))
    else:
        names = list(rows[0]) if rows else []
        texts = [t if isinstance(t, str) else " | ".join(t) for t in texts]
        width = min(60, max([len(t) for t in texts] + [4]))
        print("text".ljust(width) + "".join(f"  {t:<24}" for t in names))
        for text, row in zip(texts, rows):
            short = text if len(text) <= width else text[: width - 1] + "…"
            print(short.ljust(width) + "".join(f"  {task[t].output_cell(row[t]):<24}" for t in names))
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
