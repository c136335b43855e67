"""Retrieval with in-batch negatives only against the same with hard negatives, and against a 4x
larger batch under gradient caching (batch 128 in chunks of 32: the same examples seen, a quarter of
the steps), a few seeds each; prints JSON. Three fixtures split by film: review halves
(configs/movie-halves*.yaml: the first half of a review finds its second half), the same halves
ranked against look-alikes (configs/movie-reordered*.yaml, the ``reordered-`` recipes: each test
positive's own words with its halves swapped are in the corpus; the mined negatives come from the
training positives and their look-alikes) and review verdicts (configs/review-verdicts*.yaml, the
``verdicts-`` recipes: a review finds its film's reviews of the same verdict; the hard negative is
one of its film's reviews of the other verdict).

    python scripts/derive_examples.py
    python benchmarks/hard_negatives.py --seeds 0 1 2 > hard_negatives.json
    python benchmarks/hard_negatives.py --recipes verdicts-in-batch verdicts-negative verdicts-mined
    python benchmarks/hard_negatives.py --recipes reordered-in-batch reordered-mined
    python benchmarks/hard_negatives.py --recipes in-batch batch-128-cached --peer none
    python benchmarks/hard_negatives.py --step-cost   # a step with and without the hard negative

Mines data/derived/movie_halves_mined.jsonl first when it is missing (scripts/mine.py, one negative,
no ratio filter: in this fixture every other review half is a true negative; the mined-far recipe:
one from ranks 20 to 59). Each run trains one
epoch, nothing frozen, at batch 32 and lr 5e-5 but where the recipe says otherwise; the figures are the test split's, and the step time is
the run's training seconds. The pretrained encoder's figures come first; with the PyTorch venv
(`make peer`), the recipes named in PEER follow with sentence-transformers
(benchmarks/st_hard_negatives.py: MultipleNegativesRankingLoss, its cached form for the cached
recipes, MatryoshkaLoss for verdicts-matryoshka):

    python benchmarks/hard_negatives.py --recipes verdicts-in-batch verdicts-matryoshka
    python benchmarks/hard_negatives.py --recipes verdicts-in-batch-lr2e-4 verdicts-batch-128-cached-lr2e-4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mtl_jax.config import load_config_file
from mtl_jax.inference import load_encoder
from mtl_jax.tasks.metrics import RETRIEVAL_METRICS, retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent
DERIVED = ROOT / "data" / "derived"
# name: (config, batch size, --contrastive-chunk, --lr); the same examples seen in each (one epoch)
RECIPES = {
    "in-batch": ("configs/movie-halves.yaml", 32, 0, 5e-5),
    "mined": ("configs/movie-halves-mined.yaml", 32, 0, 5e-5),
    # 4x the in-batch negatives, in chunks of 32: a quarter of the steps, at the same and at larger rates
    "batch-128-cached": ("configs/movie-halves.yaml", 128, 32, 5e-5),
    "batch-128-cached-lr1e-4": ("configs/movie-halves.yaml", 128, 32, 1e-4),
    "batch-128-cached-lr2e-4": ("configs/movie-halves.yaml", 128, 32, 2e-4),
    "in-batch-lr2e-4": ("configs/movie-halves.yaml", 32, 0, 2e-4),  # the larger rate at batch 32: which helps
    "mined-lr2e-4": ("configs/movie-halves-mined.yaml", 32, 0, 2e-4),
    # a negative from ranks 20 to 59, not the nearest (configs written beside the runs: see BUILT)
    "mined-far-lr2e-4": ("movie-halves-mined-far.yaml", 32, 0, 2e-4),
    # a third of the queries given a false negative (their own positive restated), unguided and guided
    "planted-lr2e-4": ("movie-halves-planted.yaml", 32, 0, 2e-4),
    "planted-guided-lr2e-4": ("movie-halves-planted-guided.yaml", 32, 0, 2e-4),
    "planted-guided-margin0-lr2e-4": ("movie-halves-planted-guided-margin0.yaml", 32, 0, 2e-4),
    "planted-guided-initial-lr2e-4": ("movie-halves-planted-guided-margin0-initial.yaml", 32, 0, 2e-4),
    "matryoshka": ("configs/movie-halves-matryoshka.yaml", 32, 0, 5e-5),  # + the loss of 256, 128, 64 dims
    "matryoshka-lr2e-4": ("configs/movie-halves-matryoshka.yaml", 32, 0, 2e-4),
    # the halves ranked against look-alikes (each positive's halves swapped), in-batch only and mined
    "reordered-in-batch": ("configs/movie-reordered.yaml", 32, 0, 5e-5),
    "reordered-mined": ("configs/movie-reordered-mined.yaml", 32, 0, 5e-5),
    # the verdicts fixture: its own hard negative (the other verdict), and one mined (see verdicts_mined)
    "verdicts-in-batch": ("configs/review-verdicts.yaml", 32, 0, 5e-5),
    "verdicts-negative": ("configs/review-verdicts-negatives.yaml", 32, 0, 5e-5),
    "verdicts-mined": ("review-verdicts-mined.yaml", 32, 0, 5e-5),
    "verdicts-matryoshka": ("review-verdicts-matryoshka.yaml", 32, 0, 5e-5),  # in-batch + 256, 128, 64 dims
    "verdicts-matryoshka-64x4": ("review-verdicts-matryoshka-64x4.yaml", 32, 0, 5e-5),  # 64 dims weighed 4
    "verdicts-matryoshka-64x8": ("review-verdicts-matryoshka-64x8.yaml", 32, 0, 5e-5),  # 64 dims weighed 8
    "verdicts-batch-128-cached": ("configs/review-verdicts.yaml", 128, 32, 5e-5),
    "verdicts-batch-128-cached-lr2e-4": ("configs/review-verdicts.yaml", 128, 32, 2e-4),
    "verdicts-in-batch-lr2e-4": ("configs/review-verdicts.yaml", 32, 0, 2e-4),
    # 256 review-halves pairs beside the 12,808 sentiment snippets, sampled uniformly (each pair drawn
    # about 9 times in 150 steps): with the rule that keeps a text out of a step twice, and without it
    "beside-large": ("halves-beside-sentiment.yaml", 32, 0, 5e-5),
    "beside-large-repeats": ("halves-beside-sentiment.yaml", 32, 0, 5e-5),
}
BESIDE = ["--sampling", "uniform", "--max-steps", "150"]  # the beside-large recipes' run
# the trainer with a retrieval step allowed to hold a text twice (the sampler's rule switched off)
ALLOW_REPEATS = (
    "import mtl_jax.commands; from mtl_jax.tasks.retrieval import Retrieval; "
    "Retrieval.distinct_in_batch = False; from mtl_jax.commands.train import run; run()"
)
EXTRA = {"beside-large": BESIDE, "beside-large-repeats": BESIDE}  # a recipe's own arguments to the trainer
PROGRAM = {"beside-large-repeats": ["-c", ALLOW_REPEATS]}  # a recipe's trainer (else scripts/train.py)
# with the PyTorch venv: these recipes again with sentence-transformers (their training file and the
# peer's own arguments: the hard-negative column, the cached loss's chunk, the Matryoshka sizes); an
# in-batch recipe and one with a negative give the step cost ratio
SIZES = ["256", "128", "64"]  # the Matryoshka recipes' sizes, ranked at each in the peer's evaluation too
PEER = {
    "in-batch": ("movie_halves_train.jsonl", []),
    "mined": ("movie_halves_mined.jsonl", ["--negatives", "negatives"]),
    "reordered-in-batch": ("movie_halves_train.jsonl", []),
    "reordered-mined": ("movie_reordered_mined.jsonl", ["--negatives", "negatives"]),
    "verdicts-in-batch": ("review_verdicts_train.jsonl", ["--sizes", *SIZES]),
    "verdicts-negative": ("review_verdicts_train.jsonl", ["--negatives", "negative"]),
    "verdicts-matryoshka": ("review_verdicts_train.jsonl", ["--matryoshka", *SIZES, "--sizes", *SIZES]),
    "verdicts-in-batch-lr2e-4": ("review_verdicts_train.jsonl", []),
    "verdicts-batch-128-cached-lr2e-4": ("review_verdicts_train.jsonl", ["--chunk", "32"]),
}
PAIRED = [("in-batch", "mined"), ("reordered-in-batch", "reordered-mined"), ("verdicts-in-batch", "verdicts-negative")]
SETTINGS = ["--epochs", "1", "--freeze", "none", "--no-progress"]
FAR = ["--range-min", "20", "--range-max", "60"]  # mine.py's ranks for the mined-far recipes
REORDERED = DERIVED / "movie_reordered_corpus.jsonl"  # the training positives and their look-alikes


def mine(out: Path, *extra: str, pairs: str = "movie_halves_train.jsonl") -> Path:
    """One hard negative per training query (scripts/mine.py; for the halves, no ratio filter: in that
    fixture every other review half is a true negative), written once."""
    if not out.exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "mine.py"), "--input", str(DERIVED / pairs),
             "--negatives", "1", "--out", str(out), "--no-progress", *extra],
            check=True,
        )  # fmt: skip
    return out


def verdicts_mined(folder: Path) -> Path:
    """configs/review-verdicts.yaml with one negative mined per query by the pretrained encoder, with
    mine.py's defaults (TopK-PercPos at 0.95): its film's nearest review is as often of the same
    verdict (a false negative) as of the other."""
    mined = mine(DERIVED / "review_verdicts_mined.jsonl", pairs="review_verdicts_train.jsonl")
    text = (ROOT / "configs" / "review-verdicts.yaml").read_text()
    text = text.replace("data/derived/review_verdicts_train.jsonl", str(mined))
    return _write(folder / "review-verdicts-mined.yaml", text + "    negatives_column: negatives\n")


def far_config(folder: Path) -> Path:
    """configs/movie-halves-mined.yaml with negatives mined from ranks 20 to 59 (:data:`FAR`)."""
    mined = mine(DERIVED / "movie_halves_mined_far.jsonl", "--max-ratio", "off", *FAR)
    text = (ROOT / "configs" / "movie-halves-mined.yaml").read_text()
    return _write(
        folder / "movie-halves-mined-far.yaml", text.replace("data/derived/movie_halves_mined.jsonl", str(mined))
    )


def restated(text: str) -> str:
    """The text with every fifth word left out: the same passage in meaning, another text."""
    return " ".join(w for j, w in enumerate(text.split()) if j % 5 != 4)


def planted_config(folder: Path, margin: float | None, guide: str = "self") -> Path:
    """The training pairs, every third query given one hard negative that is its own positive restated
    (:func:`restated`: a false negative, as unfiltered mining finds them); with a ``margin``: ``guide``
    (self or initial) and that margin, which should leave those out of the query's negatives."""
    rows = [json.loads(line) for line in (DERIVED / "movie_halves_train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["negatives"] = [restated(row["positive"])] if i % 3 == 0 else []
    train = folder / "movie_halves_planted.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (ROOT / "configs" / "movie-halves-mined.yaml").read_text()
    text = text.replace("data/derived/movie_halves_mined.jsonl", str(train))
    if margin is None:
        return _write(folder / "movie-halves-planted.yaml", text)
    text += f"    guide: {guide}\n    guide_margin: {margin}\n"
    name = f"movie-halves-planted-guided{'' if margin else '-margin0'}{'-initial' if guide == 'initial' else ''}"
    return _write(folder / f"{name}.yaml", text)


def beside_config(folder: Path, pairs: int = 256) -> Path:
    """The first ``pairs`` review-halves training pairs as a small retrieval task beside the default
    config's sentiment task (12,808 snippets)."""
    small = folder / f"movie_halves_{pairs}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    small.write_text("".join((DERIVED / "movie_halves_train.jsonl").read_text().splitlines(keepends=True)[:pairs]))
    halves = (ROOT / "configs" / "movie-halves.yaml").read_text().split("tasks:\n", 1)[1]
    sentiment = (ROOT / "configs" / "default.yaml").read_text().split("  - name: task_b", 1)[1]
    text = "tasks:\n" + halves.replace("data/derived/movie_halves_train.jsonl", str(small))
    return _write(folder / "halves-beside-sentiment.yaml", text + "  - name: task_b" + sentiment)


def matryoshka_config(folder: Path, name: str, weights: list[float] | None = None) -> Path:
    """configs/review-verdicts.yaml with the loss at 256, 128 and 64 dimensions, each size's ``weights``."""
    text = (ROOT / "configs" / "review-verdicts.yaml").read_text() + "    matryoshka_dims: [256, 128, 64]\n"
    text += f"    matryoshka_weights: {weights}\n" if weights else ""
    return _write(folder / f"review-verdicts-matryoshka{name}.yaml", text)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BUILT = {  # the recipes' configs written beside the runs
    "movie-halves-mined-far.yaml": far_config,
    "movie-halves-planted.yaml": lambda folder: planted_config(folder, None),
    "movie-halves-planted-guided.yaml": lambda folder: planted_config(folder, 0.1),
    "movie-halves-planted-guided-margin0.yaml": lambda folder: planted_config(folder, 0.0),
    "movie-halves-planted-guided-margin0-initial.yaml": lambda folder: planted_config(folder, 0.0, "initial"),
    "review-verdicts-mined.yaml": verdicts_mined,
    "halves-beside-sentiment.yaml": lambda folder: beside_config(folder),
    "review-verdicts-matryoshka.yaml": lambda folder: matryoshka_config(folder, ""),
    "review-verdicts-matryoshka-64x4.yaml": lambda folder: matryoshka_config(folder, "-64x4", [1, 1, 4]),
    "review-verdicts-matryoshka-64x8.yaml": lambda folder: matryoshka_config(folder, "-64x8", [1, 1, 8]),
}


def test_file(config: str) -> Path:
    """The test split of a recipe's config (its one task's)."""
    return ROOT / load_config_file(ROOT / config)["task_list"][0].test


def test_figures(test: Path, model: str | None = None, dim: int | None = None) -> dict:
    """The test split's retrieval figures with an encoder (the pretrained one, or an export), at ``dim``
    (a row's ``negative``, if any, ranked among the passages)."""
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    encoder = load_encoder(model) if model else load_encoder()
    q = encoder.encode([r["query"] for r in rows], normalize=True, dim=dim)
    p = encoder.encode([r["positive"] for r in rows], normalize=True, dim=dim)
    negatives = [r["negative"] for r in rows if r.get("negative")]
    n = encoder.encode(negatives, normalize=True, dim=dim) if negatives else None
    return retrieval_metrics(q, p, [r["query"] for r in rows], [r["positive"] for r in rows], n, negatives)


def config_file(recipe: str, folder: Path) -> str:
    """A recipe's config, those this script builds written into ``folder``."""
    config = RECIPES[recipe][0]
    return str(BUILT[config](folder)) if config in BUILT else config


def train(recipe: str, seed: int, out: Path) -> dict:
    config, (_, batch, chunk, lr) = config_file(recipe, out.parent), RECIPES[recipe]
    test = test_file(config)
    start = time.perf_counter()
    cmd = [sys.executable, *PROGRAM.get(recipe, [str(ROOT / "scripts" / "train.py")]), "--config", config]
    cmd += ["--seed", str(seed), "--batch-size", str(batch), "--contrastive-chunk", str(chunk), "--lr", str(lr)]
    cmd += EXTRA.get(recipe, [])
    subprocess.run(cmd + SETTINGS + ["--out", str(out), "--overwrite"], cwd=ROOT, check=True, capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    result = next(v for v in summary["test"].values() if "ndcg@10" in v)  # the retrieval task's
    sized = {k: v for k, v in result.items() if k.startswith("ndcg@10@")}
    sized["prefix_ndcg@10@64"] = test_figures(test, str(out / "export"), 64)["ndcg@10"]
    return (
        {k: result[k] for k in RETRIEVAL_METRICS}
        | sized
        | {
            "train_seconds": summary["seconds"]["train"],
            "steps": summary["steps"],
            "examples_per_s": summary["examples_per_s"],
            "wall": round(time.perf_counter() - start, 1),
        }
    )


def peer(python: str, recipes: list[str], seeds: list[int], folder: Path) -> dict:
    """The same recipes with sentence-transformers (benchmarks/st_hard_negatives.py in the PyTorch venv)."""
    model = str(load_encoder().source)
    out: dict = {}
    for name in recipes:
        (train_file, extra), (_, batch, _, lr) = PEER[name], RECIPES[name]
        cmd = [python, str(ROOT / "benchmarks" / "st_hard_negatives.py"), model, str(DERIVED / train_file)]
        cmd += [str(test_file(config_file(name, folder))), "--batch-size", str(batch), "--lr", str(lr), *extra]
        runs = []
        for seed in seeds:
            run = subprocess.run(cmd + ["--seed", str(seed)], check=True, capture_output=True, text=True)
            runs.append(json.loads(run.stdout))
        scores = np.array([r["ndcg@10"] for r in runs])
        out[name] = {"runs": runs, "ndcg@10_mean": float(scores.mean()), "ndcg@10_spread": float(np.ptp(scores))}
        print(json.dumps({f"sentence-transformers {name}": runs}), file=sys.stderr)
    return out


def step_cost(batches: int = 8, rounds: int = 5) -> dict:
    """Seconds per training step on the fixture's own first ``batches`` steps, with and without the
    mined hard negative (nothing frozen, batch 32), the two runs' steps interleaved round by round in
    one process (the median round): what a hard negative costs a step, apart from the machine's noise."""
    import jax

    from mtl_jax.config import TrainConfig
    from mtl_jax.training.freezing import frozen_groups, param_groups
    from mtl_jax.training.run import setup
    from mtl_jax.training.steps import TrainState, build_train_step

    runs, key = {}, jax.random.PRNGKey(0)
    for name in ("in-batch", "mined"):
        values = load_config_file(ROOT / RECIPES[name][0])
        cfg = TrainConfig(**values, out=f"/tmp/step-cost-{name}", overwrite=True, freeze="none", progress=False)
        run = setup(cfg)
        frozen = frozen_groups("none", set(jax.tree.leaves(param_groups(run.params))))
        tx, step = build_train_step(run.model, run.params, frozen, run.optim, run.weighting, tasks=run.data.tasks)
        state = TrainState.create(run.params, tx.init(run.params), run.weighting.init(len(run.names)))
        data = [run.pipeline.train_batch(run.pipeline.plan(0)[k]) for k in range(batches)]
        for b in data:  # compile every shape, warm up
            state, out = step(state, b, key)
        jax.block_until_ready(out)
        tokens = sum(int((b.segments > 0).sum()) for b in data) / batches
        runs[name] = {"state": state, "step": step, "data": data, "rounds": [], "tokens": tokens}
    for _ in range(rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for b in r["data"]:
                r["state"], out = r["step"](r["state"], b, key)
            jax.block_until_ready(out)
            r["rounds"].append((time.perf_counter() - t0) / batches)
    per_step = {n: float(np.median(r["rounds"])) for n, r in runs.items()}
    return {
        "step_s": per_step,
        "real_tokens_per_step": {n: r["tokens"] for n, r in runs.items()},
        "grid_tokens_per_step": {n: float(np.mean([b.ids.size for b in r["data"]])) for n, r in runs.items()},
        "step_cost_ratio": per_step["mined"] / per_step["in-batch"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--out", default="runs/hard-negatives", help="the runs' folder (default: %(default)s)")
    p.add_argument(
        "--peer", default=".peer/venv/bin/python", help="the PyTorch venv's python (`make peer`); none: skip"
    )
    p.add_argument("--step-cost", action="store_true", help="only the interleaved step times (see step_cost)")
    args = p.parse_args()
    mine(DERIVED / "movie_halves_mined.jsonl", "--max-ratio", "off")
    if any(n.startswith("reordered-") for n in args.recipes):  # from the positives and their look-alikes
        mine(DERIVED / "movie_reordered_mined.jsonl", "--max-ratio", "off", "--corpus", str(REORDERED))
    if args.step_cost:
        print(json.dumps({"benchmark": "hard_negatives", "step_cost": step_cost()}))
        return
    tests = sorted({test_file(RECIPES[n][0]) for n in args.recipes if RECIPES[n][0] not in BUILT})
    report: dict = {"benchmark": "hard_negatives", "runs": {}}
    report["pretrained"] = {t.name: test_figures(t) for t in tests}
    for name in args.recipes:
        runs = [train(name, seed, Path(args.out) / f"{name}-{seed}") for seed in args.seeds]
        report["runs"][name] = runs
        scores = np.array([r["ndcg@10"] for r in runs])
        report[name] = {"ndcg@10_mean": float(scores.mean()), "ndcg@10_spread": float(np.ptp(scores))}
        print(json.dumps({name: runs}), file=sys.stderr)
    per_step = {n: np.mean([r["train_seconds"] for r in report["runs"][n]]) for n in args.recipes}
    paired = [pair for pair in PAIRED if set(pair) <= set(per_step)]
    report["step_cost_ratio"] = {f"{b} / {a}": float(per_step[b] / per_step[a]) for a, b in paired}
    python = ROOT / args.peer  # (an absolute path stays as it is)
    if python.exists() and set(args.recipes) & set(PEER):
        report["sentence_transformers"] = st = peer(
            str(python), [n for n in args.recipes if n in PEER], args.seeds, Path(args.out)
        )
        seconds = {n: np.mean([r["train_seconds"] for r in st[n]["runs"]]) for n in st}
        report["wall_ratio_vs_sentence_transformers"] = {n: float(per_step[n] / seconds[n]) for n in st}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
