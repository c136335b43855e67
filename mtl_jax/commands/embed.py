"""Embed sentences with a pretrained sentence encoder.

    python scripts/embed.py "first sentence" "second one"      # JSON lines to stdout
    python scripts/embed.py --input sentences.txt --out emb.npy  # one row per input line
    cat sentences.txt | python scripts/embed.py --out emb.npy

Errors exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtl_jax.cli import add_dtype_option, read_lines, run_cli
from mtl_jax.errors import MtlError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sentences", nargs="*", help="sentences to embed (else --input, else stdin)")
    p.add_argument("--input", help="text file, one sentence per line (blank lines embed as empty strings)")
    p.add_argument(
        "--model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="embedded model name, local checkpoint directory, or hub name (default: %(default)s)",
    )
    p.add_argument("--out", help="write a float32 .npy [N, D] here instead of JSON lines on stdout")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: %(default)s)")
    p.add_argument("--pooling", choices=["cls", "mean", "max"], help="pooling (default: the checkpoint's, else mean)")
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize embeddings (default: the checkpoint's setting)",
    )
    p.add_argument("--max-length", type=int, help="tokens per sentence (default: the checkpoint's)")
    p.add_argument(
        "--dim", type=int, help="keep the first DIM dimensions (a Matryoshka-trained model's shorter embeddings)"
    )
    p.add_argument(
        "--prompt-name", help="put the model's prompt of this name before each sentence (its export names them)"
    )
    p.add_argument("--prompt", help="put this text before each sentence")
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sentences and args.input:
        raise MtlError("give sentences as arguments or --input, not both")
    texts = args.sentences or read_lines(args.input)
    if args.out and Path(args.out).parent and not Path(args.out).parent.exists():
        raise MtlError(f"{args.out}: folder {Path(args.out).parent} does not exist")
    from mtl_jax import load_encoder

    encoder = load_encoder(args.model, dtype=args.dtype)
    emb = encoder.encode(
        texts,
        batch_size=args.batch_size,
        pooling=args.pooling,
        normalize=args.normalize,
        max_length=args.max_length,
        progress=False if args.no_progress else None,
        dim=args.dim,
        prompt_name=args.prompt_name,
        prompt=args.prompt,
    )
    if args.out:
        import numpy as np

        np.save(args.out, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 to {args.out}", file=sys.stderr)
    else:
        for text, row in zip(texts, emb):
            print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in row]}))
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(run_cli(main))
