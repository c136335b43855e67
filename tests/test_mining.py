"""Hard-negative mining: the filters against false negatives on known scores, and mtl-mine end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mtl_jax.errors import MtlError
from mtl_jax.mining import MineSettings, mine
from tests.helpers import cli

COSINES = [0.99, 0.98, 0.9, 0.5, 0.3, -0.2]  # doc 0 is the positive


def _unit(cosines) -> np.ndarray:
    """Unit vectors whose cosines with (1, 0) are ``cosines``."""
    c = np.asarray(cosines, np.float32)
    return np.stack([c, np.sqrt(1 - c**2)], axis=1)


def _mine(settings: MineSettings, rows=((0, 0),)):
    """Negatives per row for one query (1, 0); ``rows``: (query, positive doc) pairs."""
    docs = _unit(COSINES)
    excluded = [{p for _, p in rows}]
    mined = mine(_unit([1.0]), docs[[p for _, p in rows]], docs, np.array([q for q, _ in rows]), excluded, settings)
    return [n.tolist() for n in mined.negatives], mined


def test_mining_leaves_out_positives_and_filters_by_ratio_margin_and_rank():
    assert _mine(MineSettings(negatives=2))[0] == [[2, 3]]  # 0.98 > 0.95 x 0.99: a likely false negative
    assert _mine(MineSettings(negatives=2, max_ratio=None))[0] == [[1, 2]]
    assert _mine(MineSettings(negatives=2, max_ratio=None, margin=0.5))[0] == [[4, 5]]  # at most 0.49
    assert _mine(MineSettings(negatives=2, max_ratio=None, range_min=2))[0] == [[3, 4]]  # ranks 2, 3 of 1..5
    assert _mine(MineSettings(negatives=9, max_ratio=None, range_max=3))[0] == [[1, 2, 3]]
    # a query with two positives (two rows): neither is a negative of either row; each row's own
    # positive score sets its filter (0.98 x 0.95 lets 0.9 in for the second row too)
    negatives, mined = _mine(MineSettings(negatives=1), rows=((0, 0), (0, 1)))
    assert negatives == [[2], [2]] and mined.positive_scores == pytest.approx([0.99, 0.98], abs=1e-6)
    few, mined = _mine(MineSettings(negatives=3, max_ratio=None, margin=0.8))
    assert few == [[5]] and "0 with 3 negatives, 1 with fewer" in mined.summary(3)
    with pytest.raises(MtlError, match="range-min"):
        _mine(MineSettings(range_min=5, range_max=5))


def test_mine_command_writes_negatives_that_are_never_a_positive_of_the_query(tmp_path, tiny_bert):
    pairs = [
        {"query": f"who likes {w}", "positive": f"{name} likes {w}"}
        for w in ("tea", "rain", "jazz", "chess")
        for name in ("ann", "bob")
    ]  # fmt: skip  (each query has two positives)
    pairs += [{"query": f"where is {c}", "positive": f"{c} is in the north"} for c in ("oslo", "rome", "lima")]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    out = tmp_path / "mined.csv"
    res = cli(
        "mine",
        "--input",
        str(src),
        "--model",
        str(tiny_bert),
        "--negatives",
        "2",
        "--max-ratio",
        "off",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "11 rows: 11 with 2 negatives" in res.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["query", "positive", "negative_1", "negative_2"] and len(rows) == 11
    positives = {}
    for r in pairs:
        positives.setdefault(r["query"], set()).add(r["positive"])
    for r in rows:
        negatives = {r["negative_1"], r["negative_2"]}
        assert len(negatives) == 2 and not negatives & positives[r["query"]] and r["query"] not in negatives
    listed = tmp_path / "mined.jsonl"
    res = cli("mine", "--input", str(src), "--model", str(tiny_bert), "--negatives", "3", "--out", str(listed))
    assert res.returncode == 0, res.stderr
    assert all(len(json.loads(line)["negatives"]) <= 3 for line in listed.read_text().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined.csv", "mined.jsonl", "pairs.jsonl"]  # no partial file


def test_mine_command_names_the_bad_row_and_writes_nothing(tmp_path, tiny_bert):
    src = tmp_path / "pairs.jsonl"
    src.write_text('{"query": "a b", "positive": "c d"}\n{"query": "e f", "positive": "  "}\n')
    out = tmp_path / "mined.jsonl"
    res = cli("mine", "--input", str(src), "--model", str(tiny_bert), "--out", str(out))
    assert (
        res.returncode == 2 and f"{src}:2: no text in field 'positive'" in res.stderr and "Traceback" not in res.stderr
    )
    res = cli("mine", "--input", str(src), "--model", str(tiny_bert), "--out", str(tmp_path / "mined.txt"))
    assert res.returncode == 2 and "write .jsonl, .csv, .tsv" in res.stderr
    assert not out.exists()
