#!/usr/bin/env python
"""Evaluation at scale: a retrieval split of many pairs through ``evaluate()`` (what the trainer runs
on validation and test), with the embedded encoder.

Prints one JSON line per figure:
  memory      ``--queries`` pairs (default 100,000; synthetic query / positive texts from the embedded
              reviews) in one pass, its compiles included: seconds, examples/s, the process's resident
              memory before and at its peak during the evaluation (sampled every 20 ms) and what the
              evaluation added, and nDCG@10
  progress    ``--bar-queries`` pairs evaluated with and without the progress bar, rounds interleaved:
              examples/s of each and their ratio (the bar should cost nothing)

    python benchmarks/eval_scale.py --folder /tmp/eval_scale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl_jax.training.hostmem import reuse_host_memory  # noqa: E402

reuse_host_memory()  # as the command-line programs do, before JAX's first computation

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from tqdm.auto import tqdm  # noqa: E402

from benchmarks.data_scale import write_pairs  # noqa: E402
from mtl_jax.config import TrainConfig  # noqa: E402
from mtl_jax.tasks import TaskConfig  # noqa: E402
from mtl_jax.training.evaluation import evaluate  # noqa: E402
from mtl_jax.training.run import setup  # noqa: E402
from mtl_jax.training.steps import make_eval_step  # noqa: E402


def rss_gb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


class PeakRss:
    """The highest resident memory seen while the block runs (sampled on a thread)."""

    def __enter__(self):
        self.peak, self.done = rss_gb(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, rss_gb())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_gb())


def prepared_run(folder: Path, queries: int, train: Path):
    """A run whose validation split is ``queries`` pairs (the training split: ``train``), set up."""
    val = write_pairs(folder / f"val_{queries}", queries, seed=1)
    task = TaskConfig(
        "pairs", str(train), validation=str(val), test=str(val), type="retrieval", text_columns=("query", "positive")
    )
    cfg = TrainConfig(
        task_list=(task,), out=str(folder / "run"), overwrite=True, max_steps=1, progress=False,
        data_cache=str(folder / "cache"), compile_cache="off",
    )  # fmt: skip
    run = setup(cfg)
    return run, make_eval_step(run.model, run.data.tasks)


def timed(run, eval_step, bar: bool) -> tuple[float, dict]:
    data = run.pipeline.splits["validation"]
    t0 = time.perf_counter()
    with tqdm(total=len(data), unit="ex", leave=False, disable=not bar, file=sys.stderr) as b:
        result = evaluate(eval_step, run.params, run.pipeline, data, run.data.tasks, b if bar else None)
    return time.perf_counter() - t0, result


def memory_figure(folder: Path, queries: int, train: Path) -> dict:
    run, eval_step = prepared_run(folder, queries, train)
    before = rss_gb()  # (one pass, its compiles included: a second pass of 100,000 pairs is minutes more)
    with PeakRss() as peak:
        seconds, result = timed(run, eval_step, bar=False)
    return {
        "figure": "memory", "queries": queries, "seconds": round(seconds, 1),
        "examples_per_s": round(queries / seconds, 1), "rss_before_gb": round(before, 2),
        "peak_rss_gb": round(peak.peak, 2), "evaluation_added_gb": round(peak.peak - before, 2),
        "ndcg@10": round(result["pairs"]["ndcg@10"], 4),
    }  # fmt: skip


def progress_figure(folder: Path, queries: int, train: Path, rounds: int) -> dict:
    run, eval_step = prepared_run(folder, queries, train)
    timed(run, eval_step, bar=False)
    seconds = {False: 0.0, True: 0.0}
    for _ in range(rounds):
        for bar in (False, True):
            seconds[bar] += timed(run, eval_step, bar)[0]
    rate = {bar: rounds * queries / s for bar, s in seconds.items()}
    return {
        "figure": "progress", "queries": queries, "rounds": rounds,
        "examples_per_s_without_bar": round(rate[False], 1), "examples_per_s_with_bar": round(rate[True], 1),
        "ratio": round(rate[True] / rate[False], 3),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/eval_scale")
    p.add_argument("--queries", type=int, default=100_000)
    p.add_argument("--bar-queries", type=int, default=4_000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    folder = Path(args.folder)
    train = write_pairs(folder / "train", 2_000, seed=2)
    for figure in (
        progress_figure(folder, args.bar_queries, train, args.rounds),
        memory_figure(folder, args.queries, train),
    ):
        print(json.dumps({"benchmark": "eval_scale"} | figure), flush=True)


if __name__ == "__main__":
    main()
