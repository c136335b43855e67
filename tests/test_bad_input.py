"""Bad input through the command line, one matrix: what is an error exits 2 with one line naming
the file:line or the flag and the reason, and writes nothing (an earlier run in --out keeps every
file); what is valid input (a long field, ``1`` beside ``1.0``, a name repeated in --tasks, two
tasks reading one file through different text columns) trains as meant."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from tests.helpers import cli, tiny_train_args

TOPICS = {"sports": "match goal team", "politics": "vote senate law", "tech": "chip code robot"}


def _topic_csv(path: Path, n: int = 60, extra: str = "") -> Path:
    lines = ["text,label"] + [
        f'"a {TOPICS[t].split()[i % 3]} story {i}",{t}' for i, t in zip(range(n), list(TOPICS) * n)
    ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tasks(folder: Path, *tasks: str) -> Path:
    (folder / "tasks.yaml").write_text("tasks:\n" + "".join(tasks))
    return folder / "tasks.yaml"


def _task(name: str, train: Path, text: str = "text", label: str = "label") -> str:
    return f"  - name: {name}\n    train: {train}\n    text_column: {text}\n    label_column: {label}\n"


def _nan_label(d: Path):
    rows = [{"text": f"a {w} story", "label": lab} for w, lab in [("goal", "a"), ("vote", "b")] * 20]
    path = d / "nan.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"text": "what", "label": NaN}\n')
    return [_task("t", path)], r"nan\.jsonl:41: missing label in column 'label'"


def _truncated(suffix: str, opener):
    def make(d: Path):
        raw = _topic_csv(d / "raw.csv").read_bytes()
        packed = d / f"topic.csv{suffix}"
        with opener(packed, "wb") as f:
            f.write(raw)
        packed.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
        return [_task("t", packed)], rf"topic\.csv\{suffix}: cannot read \(truncated archive"

    return make


def _empty_file(d: Path):
    (d / "empty.csv").write_bytes(b"")
    return [_task("t", d / "empty.csv")], r"task t has no training examples"


def _unterminated_quote(d: Path):
    path = _topic_csv(d / "q.csv", extra='"an open quote,tech\nmore,tech\n')
    return [_task("t", path)], r"q\.csv:62: 1 fields, header has 2 \(an unterminated quote\?\)"


def _bad_jsonl_row(d: Path):
    path = d / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    return [_task("t", path)], r"bad\.jsonl:2: invalid JSON"


def _duplicate_names(d: Path):
    path = _topic_csv(d / "topic.csv")
    return [
        _task("t", path),
        _task("t", path, label="label"),
    ], r"tasks\.yaml: task names must be unique, got \['t', 't'\]"


ERRORS = {  # case -> (files and tasks, expected message) or (flags, expected message)
    "duplicate task names": _duplicate_names,
    "NaN label": _nan_label,
    "truncated .gz": _truncated(".gz", gzip.open),
    "truncated .bz2": _truncated(".bz2", bz2.open),
    "0-byte file": _empty_file,
    "unterminated quote": _unterminated_quote,
    "bad JSONL row": _bad_jsonl_row,
    "--batch-size 0": (["--batch-size", "0"], r"--batch-size 0: must be at least 1"),
    "--max-length 1": (["--max-length", "1"], r"--max-length 1: must be at least 2"),
    "unknown --freeze": (["--freeze", "spine"], r"--freeze.*spine"),
    "--lora-rank 0": (["--freeze", "lora", "--lora-rank", "0"], r"--lora-rank 0: must be at least 1"),
    "unknown --tasks name": (["--tasks", "topic,sport"], r"--tasks: unknown task\(s\) sport; known: topic, sentiment"),
    "--coordinator alone": (
        ["--coordinator", "127.0.0.1:1"],
        r"coordinator 127\.0\.0\.1:1: also give --num-processes and --process-id",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_bert, tiny_data, case):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("an earlier run\n")  # --overwrite must not touch it on an error
    spec = ERRORS[case]
    if callable(spec):
        tasks, message = spec(tmp_path)
        args = tiny_train_args(tiny_bert, tiny_data, "--out", str(out), "--overwrite")
        args[1] = str(_tasks(tmp_path, *tasks))
    else:
        flags, message = spec
        args = tiny_train_args(tiny_bert, tiny_data, "--out", str(out), "--overwrite", *flags)
    r = cli("train", *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == "an earlier run\n"


def test_resume_of_an_empty_folder_exits_2(tmp_path, tiny_bert, tiny_data):
    (tmp_path / "empty").mkdir()
    r = cli("train", *tiny_train_args(tiny_bert, tiny_data, "--out", str(tmp_path / "empty"), "--resume"))
    assert r.returncode == 2 and "config.json: missing; --resume needs the --out of an earlier run" in r.stderr
    assert list((tmp_path / "empty").iterdir()) == []


def _train(tmp_path: Path, tiny_bert: Path, tiny_data: Path, tasks: list[str], *flags: str) -> dict:
    args = tiny_train_args(tiny_bert, tiny_data, "--out", str(tmp_path / "run"), "--max-steps", "4", *flags)
    args[1] = str(_tasks(tmp_path, *tasks))
    r = cli("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "run" / "config.json").read_text()) | {
        "summary": json.loads((tmp_path / "run" / "summary.json").read_text())
    }


def test_valid_inputs_train_as_meant(tmp_path, tiny_bert, tiny_data):
    """In one run: a field longer than csv's default limit is a long text (truncated, counted); JSON 1
    and 1.0 are one label; two tasks reading one file through different text columns each get their
    own examples; a task named twice in --tasks trains once."""
    long = _topic_csv(tmp_path / "long.csv", extra=f'"{"word " * 40_000}",tech\n')  # 200,000 characters
    numbers = [
        {"text": f"a {w} story {i}", "label": lab} for i, (w, lab) in enumerate([("goal", 1), ("vote", 2.0)] * 20)
    ]
    numbers += [{"text": "another goal", "label": 1.0}]
    both = [{"title": f"a {w} story {i}", "body": f"{mood} {i}", "topic": t, "mood": m}
            for i, (w, t, mood, m) in enumerate([("goal", "sports", "great fun", "pos"), ("vote", "politics", "dull mess", "neg")] * 30)]  # fmt: skip
    tasks = [
        _task("long", long),
        _task("numbers", _jsonl(tmp_path / "n.jsonl", numbers)),
        _task("topic", _jsonl(tmp_path / "both.jsonl", both), "title", "topic"),
        _task("mood", tmp_path / "both.jsonl", "body", "mood"),
    ]
    run = _train(tmp_path, tiny_bert, tiny_data, tasks, "--tasks", "long,numbers,topic,mood,topic")
    truncated = run["summary"]["truncated"]
    assert truncated["train"] + truncated["validation"] + truncated["test"] == 1
    assert run["labels"] == {
        "long": ["politics", "sports", "tech"],
        "numbers": ["1", "2"],
        "topic": ["politics", "sports"],
        "mood": ["neg", "pos"],
    }  # (the repeated topic once, in the order first named)
    # each of the two tasks on one file has its own examples: 60 rows read twice, split 80/10/10 per task
    assert run["summary"]["test"]["topic"]["examples"] == 6 and run["summary"]["test"]["mood"]["examples"] == 6
