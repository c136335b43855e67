"""Small learnable files for every task type (tests/test_task_types.py): each signal is a word or two
a tiny random encoder can pick up. ``write_typed_data(folder)`` writes them and ``types.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOPICS = {"sports": ["match", "goal", "team"], "politics": ["vote", "senate", "law"], "tech": ["chip", "code", "robot"]}
NAMES = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "rome", "oslo", "lima"]

TYPES_YAML = """\
tasks:
  - name: nli
    type: pair_classification
    train: pairs.jsonl
    text_columns: [premise, hypothesis]
    label_column: label
  - name: sts
    type: similarity
    train: sts.csv
    text_columns: [a, b]
    label_column: score
    score_range: [0, 5]
    matryoshka_dims: [16, 8]
  - name: qa
    type: retrieval
    train: qa.jsonl
    text_columns: [query, answer]
    negatives_column: negatives
    matryoshka_dims: [16, 8]
  - name: ner
    type: tagging
    train: ner.conll
    format: conll
  - name: tags
    type: multilabel
    train: tags.jsonl
    text_column: text
    label_column: labels
  - name: stars
    type: regression
    train: stars.csv
    text_column: text
    label_column: stars
  - name: topic
    train: topic.csv
    text_column: text
    label_column: label
"""


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_typed_data(folder: Path, n: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    topic_of = lambda i: list(TOPICS)[i % 3]  # noqa: E731
    word = lambda t: str(rng.choice(TOPICS[t]))  # noqa: E731
    pairs = []
    for i in range(n):
        t, same = topic_of(i), i % 2 == 0
        other = t if same else topic_of(i + 1)
        pairs.append(
            {
                "premise": f"a {word(t)} story {i}",
                "hypothesis": f"the {word(other)} news",
                "label": "same" if same else "other",
            }
        )
    _jsonl(folder / "pairs.jsonl", pairs)
    with open(folder / "sts.csv", "w", encoding="utf-8") as f:
        f.write("a,b,score\n")
        for i in range(n):
            t, level = topic_of(i), i % 3  # 0: other topic, 1: same topic, 2: same word
            w = word(t)
            b = w if level == 2 else (word(t) if level == 1 else word(topic_of(i + 1)))
            f.write(f"the {w} item {i},a {b} thing,{[0.0, 2.5, 5.0][level]}\n")
    qa = []
    for i in range(n):
        w = word(topic_of(i))
        others = [f"{NAMES[(i + k) % 4]} likes the {w} {i}" for k in (1, 2)]  # hard negatives: none, one or two
        qa.append(
            {
                "query": f"who {NAMES[i % 4]} {w}",
                "answer": f"{NAMES[i % 4]} likes the {w} {i}",
                "negatives": others[: i % 3],
            }
        )
    _jsonl(folder / "qa.jsonl", qa)
    lines = []
    for i in range(n):
        name, place = NAMES[i % 4].title(), PLACES[(i // 4) % 4].title()
        toks = [("yesterday", "O"), (name, "B-PER"), ("smith", "I-PER"), ("went", "O"), ("to", "O"), (place, "B-LOC")]
        lines += [f"{w} X X {t}" for w, t in toks] + [""]
    (folder / "ner.conll").write_text("-DOCSTART- -X- -X- O\n\n" + "\n".join(lines), encoding="utf-8")
    tags = []
    for i in range(n):
        chosen = sorted({topic_of(i), topic_of(i // 3)})
        tags.append({"text": " and ".join(f"the {word(t)}" for t in chosen) + f" {i}", "labels": chosen})
    _jsonl(folder / "tags.jsonl", tags)
    with open(folder / "stars.csv", "w", encoding="utf-8") as f:
        f.write("text,stars\n")
        for i in range(n):
            k = i % 5
            f.write(f"{' '.join(['great'] * k + ['fine'] * (4 - k))} film {i},{k + 1}\n")
    with open(folder / "topic.csv", "w", encoding="utf-8") as f:
        f.write("text,label\n")
        for i in range(n):
            f.write(f"a {word(topic_of(i))} story {i},{topic_of(i)}\n")
    (folder / "types.yaml").write_text(TYPES_YAML)
    return folder


def _tsv(path: Path, header: list[str] | None, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(str(x) for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


GLUE_HEADERS = {  # as GLUE's download script writes them (CoLA: no header row)
    "SST-2": ["sentence", "label"],
    "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "STS-B": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
    "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "MNLI": ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
    "QNLI": ["index", "question", "sentence", "label"],
    "RTE": ["index", "sentence1", "sentence2", "label"],
    "WNLI": ["index", "sentence1", "sentence2", "label"],
}  # fmt: skip


def write_glue(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """``folder/glue_data`` laid out as GLUE's download script writes it (the same file names, headers
    and columns; CoLA without a header row; quote characters as text), with small learnable contents."""
    rng = np.random.default_rng(seed)
    g = folder / "glue_data"
    good = lambda i: i % 2 == 0  # noqa: E731
    w = lambda i: str(rng.choice(TOPICS[list(TOPICS)[i % 3]]))  # noqa: E731
    pair = lambda i: [f"a {w(i)} story {i}", f"the {w(i) if good(i) else 'other'} thing"]  # noqa: E731
    nli = lambda i: ["entailment", "contradiction", "neutral"][i % 3]  # noqa: E731
    entails = lambda i: "entailment" if good(i) else "not_entailment"  # noqa: E731
    rows = {  # per task: the row of example i
        "CoLA": lambda i: ["gj04", int(good(i)), "" if good(i) else "*", f'"the {w(i)} is fine {i}' if good(i) else f"fine is the {i} the"],
        "SST-2": lambda i: [f"{'great' if good(i) else 'dull'} film {i}", int(good(i))],
        "MRPC": lambda i: [int(good(i)), i, i + 1, *pair(i)],
        "STS-B": lambda i: [i, "main", "f", "2012", i, "s", "s", *pair(i), 4.5 if good(i) else 0.5],
        "QQP": lambda i: [i, 2 * i, 2 * i + 1, *pair(i), int(good(i))],
        "MNLI": lambda i: [i, i, i, "fiction", "(", "(", "(", "(", f"a {w(i)} {i}", f"{nli(i)} word", nli(i), nli(i)],
        "QNLI": lambda i: [i, *pair(i), entails(i)],
        "RTE": lambda i: [i, *pair(i), entails(i)],
        "WNLI": lambda i: [i, *pair(i), int(good(i))],
    }  # fmt: skip
    for task, row in rows.items():
        for split, m in (("train", n), ("dev", n // 4)):
            names = [split] if task != "MNLI" or split == "train" else ["dev_matched", "dev_mismatched"]
            for name in names:
                _tsv(g / task / f"{name}.tsv", GLUE_HEADERS.get(task), [row(i) for i in range(m)])
    return g
