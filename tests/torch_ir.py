"""Run by the tests with a PyTorch venv's python (`make peer`), never imported by them:
sentence-transformers' InformationRetrievalEvaluator on an exported model directory.

    python tests/torch_ir.py EXPORT_DIR < rows.json   # rows: [[query, positive, *negatives], ...] -> {metric: value}

Queries and passages get an id per distinct text; every passage a row pairs with a query is relevant
to it; a row's hard negatives are passages of the corpus relevant to no query (unless paired).
Nothing here imports mtl_jax (benchmarks/st_hard_negatives.py imports :func:`ir_figures`).
"""

import json
import sys

from sentence_transformers import SentenceTransformer
from sentence_transformers.evaluation import InformationRetrievalEvaluator


def ir_figures(model, rows, dim: int | None = None) -> dict:
    """The evaluator's cosine figures for ``model`` on (query, positive, *negatives) ``rows``, with the
    embeddings' first ``dim`` dimensions (all by default)."""
    query_id = {q: f"q{i}" for i, q in enumerate(dict.fromkeys(r[0] for r in rows))}
    passages = [r[1] for r in rows] + [n for r in rows for n in r[2:]]
    doc_id = {p: f"d{i}" for i, p in enumerate(dict.fromkeys(passages))}
    relevant: dict = {}
    for q, p, *_ in rows:
        relevant.setdefault(query_id[q], set()).add(doc_id[p])
    evaluator = InformationRetrievalEvaluator(
        {i: q for q, i in query_id.items()},
        {i: p for p, i in doc_id.items()},
        relevant,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1],
        precision_recall_at_k=[1, 10],
        map_at_k=[100],
        show_progress_bar=False,
        truncate_dim=dim,
    )
    return {k.split("cosine_", 1)[1]: v for k, v in evaluator(model).items() if "cosine_" in k}


if __name__ == "__main__":
    json.dump(ir_figures(SentenceTransformer(sys.argv[1], device="cpu"), json.load(sys.stdin)), sys.stdout)
