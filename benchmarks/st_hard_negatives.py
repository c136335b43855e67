"""The hard-negatives recipe with sentence-transformers (run with the PyTorch venv's python, `make
peer`; nothing here imports mtl_jax): MultipleNegativesRankingLoss over (query, positive[, negative])
batches with no repeated text in a batch, AdamW at lr 5e-5 with 6% linear warm-up then linear decay,
weight decay 0.01, gradients clipped at norm 1, one epoch at batch 32; then the test split's figures
from InformationRetrievalEvaluator. Prints JSON.

    .peer/venv/bin/python benchmarks/st_hard_negatives.py MODEL_DIR TRAIN.jsonl TEST.jsonl --seed 0 [--negatives COLUMN]

`--chunk 32` trains with CachedMultipleNegativesRankingLoss in chunks of 32 (the batch larger than a
chunk), `--matryoshka 256 128 64` wraps the loss in MatryoshkaLoss at those sizes and the full one;
`--sizes` are the prefixes the test split is also ranked with (InformationRetrievalEvaluator's
``truncate_dim``).

The loop is written out (the trainer needs `datasets` and `accelerate`, which the peer venv does
not carry); the loss, the model and the evaluator are sentence-transformers' own.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer, losses
from transformers import get_linear_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from torch_ir import ir_figures  # noqa: E402  (the evaluator, as the tests call it)


def batches(rows, size, rng):
    """Shuffled batches of ``size`` with no text twice in a batch (as NoDuplicatesBatchSampler deals them)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    while order:
        batch, seen, rest = [], set(), []
        for i in order:
            texts = set(rows[i])
            if len(batch) < size and not texts & seen:
                batch.append(i)
                seen |= texts
            else:
                rest.append(i)
        out.append(batch)
        order = rest
    return [b for b in out if len(b) == size]  # (drop_last)


def _first(value) -> list:
    """A hard-negative cell's first text, as a list (empty when it holds none)."""
    return list(value[:1]) if isinstance(value, list) else [value] if value else []


def ranking_loss(model, chunk: int, sizes: list[int]):
    """MultipleNegativesRankingLoss, cached in chunks of ``chunk`` (0: not), under MatryoshkaLoss at
    ``sizes`` and the full size (none: not)."""
    if chunk:
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=chunk)
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    if sizes:
        loss = losses.MatryoshkaLoss(model, loss, [model.get_sentence_embedding_dimension(), *sizes])
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--negatives", help="the hard-negative column: a list (only its first is used) or one text")
    p.add_argument("--chunk", type=int, default=0, help="CachedMultipleNegativesRankingLoss in chunks of this many")
    p.add_argument(
        "--matryoshka", type=int, nargs="+", default=[], help="MatryoshkaLoss at these sizes besides the full one"
    )
    p.add_argument(
        "--sizes", type=int, nargs="*", default=[64], help="also evaluate these prefixes (default: %(default)s)"
    )
    args = p.parse_args()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]  # noqa: E731
    train, test = read(args.train), read(args.test)
    negative = (lambda r: []) if not args.negatives else (lambda r: _first(r[args.negatives]))  # noqa: E731
    rows = [[r["query"], r["positive"]] + negative(r) for r in train]
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = 128
    loss = ranking_loss(model, args.chunk, args.matryoshka)
    plan = batches(rows, args.batch_size, random.Random(args.seed))
    decay = [p for n, p in model.named_parameters() if not any(k in n for k in ("bias", "LayerNorm"))]
    other = [p for n, p in model.named_parameters() if any(k in n for k in ("bias", "LayerNorm"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=args.lr
    )
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * len(plan)), len(plan))
    model.train()
    start = time.perf_counter()
    for batch in plan:
        width = min(len(rows[i]) for i in batch)
        features = [model.tokenize([rows[i][j] for i in batch]) for j in range(width)]
        value = loss(features, None)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    ranked = [(r["query"], r["positive"], *_first(r.get("negative"))) for r in test]
    sized = {f"ndcg@10@{d}": ir_figures(model, ranked, d)["ndcg@10"] for d in args.sizes}
    print(
        json.dumps(
            {"seed": args.seed, "steps": len(plan), "train_seconds": round(seconds, 1)}
            | ir_figures(model, ranked)
            | sized
        )
    )


if __name__ == "__main__":
    main()
