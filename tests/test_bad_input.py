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

from mtl_jax.data.load import BadRows, load_tasks
from mtl_jax.errors import MtlError
from mtl_jax.tasks import TaskConfig
from tests.helpers import cli, file_task, tiny_train_args, write_file, yes_no_rows

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


def _empty_split(name: str, content: bytes):
    def make(d: Path):
        (d / name).write_bytes(content)
        split = "validation" if name.endswith(".jsonl") else "test"
        task = _task("t", _topic_csv(d / "topic.csv")) + f"    {split}: {d / name}\n"
        return [task], rf"{name}: no examples \(the {split} split of task\(s\) t\)"

    return make


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
    "0-byte CoNLL test file": _empty_split("empty.conll", b""),
    "0-byte JSONL validation file": _empty_split("empty.jsonl", b""),
    "CSV test file with a header only": _empty_split("header.csv", b"text,label\n"),
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
    and 1.0 are one label, and so are a CSV's 1, 1.0 and 1e0 (numbers in numeric order); two tasks reading one file through different text columns each get their
    own examples; a task named twice in --tasks trains once."""
    long = _topic_csv(tmp_path / "long.csv", extra=f'"{"word " * 40_000}",tech\n')  # 200,000 characters
    numbers = [
        {"text": f"a {w} story {i}", "label": lab} for i, (w, lab) in enumerate([("goal", 1), ("vote", 2.0)] * 20)
    ]
    numbers += [{"text": "another goal", "label": 1.0}]
    spellings = ["1", "1.0", "1e0", "2", "2.00", "10"]  # a CSV's numbers as written: three labels, in numeric order
    (tmp_path / "n.csv").write_text(
        "text,label\n" + "".join(f"a {w} story {i},{spellings[i % 6]}\n" for i, w in enumerate(["goal", "vote"] * 30))
    )
    both = [{"title": f"a {w} story {i}", "body": f"{mood} {i}", "topic": t, "mood": m}
            for i, (w, t, mood, m) in enumerate([("goal", "sports", "great fun", "pos"), ("vote", "politics", "dull mess", "neg")] * 30)]  # fmt: skip
    tasks = [
        _task("long", long),
        _task("numbers", _jsonl(tmp_path / "n.jsonl", numbers)),
        _task("csv_numbers", tmp_path / "n.csv"),
        _task("topic", _jsonl(tmp_path / "both.jsonl", both), "title", "topic"),
        _task("mood", tmp_path / "both.jsonl", "body", "mood"),
    ]
    run = _train(tmp_path, tiny_bert, tiny_data, tasks, "--tasks", "long,numbers,csv_numbers,topic,mood,topic")
    truncated = run["summary"]["truncated"]
    assert truncated["train"] + truncated["validation"] + truncated["test"] == 1
    assert run["labels"] == {
        "long": ["politics", "sports", "tech"],
        "numbers": ["1", "2"],
        "csv_numbers": ["1", "2", "10"],
        "topic": ["politics", "sports"],
        "mood": ["neg", "pos"],
    }  # (the repeated topic once, in the order first named)
    meta = {t["name"]: t for t in json.loads((tmp_path / "run" / "export" / "mtl_jax.json").read_text())["tasks"]}
    assert meta["csv_numbers"]["labels_are_numbers"] and not meta["topic"]["labels_are_numbers"]
    # each of the two tasks on one file has its own examples: 60 rows read twice, split 80/10/10 per task
    assert run["summary"]["test"]["topic"]["examples"] == 6 and run["summary"]["test"]["mood"]["examples"] == 6


def test_embed_errors_are_one_line_with_status_2(tmp_path, tiny_bert):
    (tmp_path / "s.txt").write_text("one\n")
    errors = {
        "nope: no such directory": ["--model", str(tmp_path / "nope"), "x"],
        "missing.txt: file not found": ["--input", str(tmp_path / "missing.txt")],
        "give sentences as arguments or --input, not both": ["x", "--input", str(tmp_path / "s.txt")],
        "batch_size must be positive, got 0": ["--batch-size", "0", "x"],
        f"{tmp_path / 'no' / 'e.npy'}: folder {tmp_path / 'no'} does not exist": [
            "--out",
            str(tmp_path / "no" / "e.npy"),
            "x",
        ],
    }
    for message, args in errors.items():
        r = cli("embed", "--model", str(tiny_bert), *args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr, (args, r)
    assert not (tmp_path / "no").exists()


def test_train_bad_data_exits_2_and_writes_nothing(tmp_path, tiny_bert):
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "text,label\n" + "ok,a\n ,b\nfine,\n" + "".join(f"s{i},{'a' if i % 2 else 'b'}\n" for i in range(30))
    )
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"tasks": [{"name": "t", "train": str(bad)}]}))
    out = tmp_path / "run"
    r = cli("train", "--config", str(cfg), "--encoder", str(tiny_bert), "--out", str(out))
    assert r.returncode == 2
    assert f"{bad}:3: empty text" in r.stderr and f"{bad}:4: missing label in column 'label'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--loss-weighting", "gradnrom"], "invalid choice 'gradnrom' for argument '--loss-weighting'"),
        (["--grad-accum", "3"], "--grad-accum 3: does not divide --batch-size 8"),
        (["--grad-accum", "0"], "--grad-accum 0: must be at least 1"),
        (["--gradnorm-alpha", "-1"], "--gradnorm-alpha -1.0: must be 0 or more"),
        (["--dwa-period", "0"], "--dwa-period 0: must be at least 1"),
        (["--patience", "2", "--empty-validation"], "--patience 2: there is no validation data to stop on"),
        (["--eval-every", "x"], "Error parsing --eval-every: invalid literal for int()"),
    ],
)
def test_train_bad_options_exit_2_with_one_line_naming_the_flag(tmp_path, tiny_bert, tiny_data, options, message):
    config = tiny_data / "tasks.yaml"
    if "--empty-validation" in options:  # four examples per class: the 10% validation split rounds to none
        options = [o for o in options if o != "--empty-validation"]
        (tmp_path / "few.csv").write_text("text,label\n" + "".join(f"a {w} {i},{w}\n" for i in range(4) for w in "xy"))
        config = tmp_path / "tasks.yaml"
        config.write_text(f"tasks:\n  - name: topic\n    train: {tmp_path / 'few.csv'}\n")
    out = tmp_path / "run"
    args = tiny_train_args(tiny_bert, tiny_data, "--out", str(out), *options)
    args[args.index("--config") + 1] = str(config)
    r = cli("train", *args)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "content, message",
    [
        ("text,label\n   ,x\n" + yes_no_rows(), r"a\.csv:2: empty text"),
        ("text,label\nhello,\n" + yes_no_rows(), r"a\.csv:2: missing label in column 'label'"),
        ("text,label\nhello,x,extra\n" + yes_no_rows(), r"a\.csv:2: 3 fields, header has 2"),
        (b"text,label\nbad \xff byte,x\n" + yes_no_rows().encode(), r"a\.csv:2: invalid UTF-8"),
    ],
)
def test_bad_rows_are_named_by_file_and_line(tmp_path, content, message):
    p = write_file(tmp_path / "a.csv", content)
    with pytest.raises(BadRows, match=message):
        load_tasks([file_task(p)])
    data = load_tasks([file_task(p)], skip_bad_rows=True)
    assert len(data.splits["train"]) + len(data.splits["validation"]) + len(data.splits["test"]) == 40
    assert any("skipped 1 bad rows" in n for n in data.notes)


def test_label_outside_explicit_list(tmp_path):
    p = write_file(tmp_path / "a.csv", "text,label\n" + yes_no_rows() + "odd one,maybe\n")
    with pytest.raises(BadRows, match=r"a\.csv:42: label 'maybe' not in the labels of task t \(no, yes\)"):
        load_tasks([file_task(p, labels=("no", "yes"))])


def test_many_bad_rows_are_listed_up_to_a_limit(tmp_path):
    p = write_file(tmp_path / "a.csv", "text,label\n" + " ,x\n" * 30 + yes_no_rows())
    with pytest.raises(BadRows) as e:
        load_tasks([file_task(p)])
    assert len(e.value.problems) == 30
    assert "... and 10 more bad rows" in str(e.value) and "30 bad rows" in str(e.value)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, r"missing\.csv: file not found"),
        ("a.csv", "txt,label\nx,y\n", r"a\.csv:1: no column 'text' \(columns: txt, label\)"),
        ("a.csv", "text,label\n", r"task t has no training examples"),
        ("a.csv", "text,label\n" + "".join(f"s{i},same\n" for i in range(20)), r"needs at least two classes"),
        ("a.xlsx", "x", r"unknown format"),
    ],
)
def test_file_level_errors(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        write_file(p, content)
    with pytest.raises(MtlError, match=message):
        load_tasks([file_task(p)])


def test_config_file_errors_name_the_file(tmp_path):
    from mtl_jax.config import load_config_file

    bad = write_file(tmp_path / "c.yaml", "tasks:\n  - name: x\n    train: a.csv\n    colour: red\n")
    with pytest.raises(MtlError, match=r"c\.yaml: tasks\[0\]: unknown task key\(s\) colour"):
        load_config_file(bad)
    bad = write_file(tmp_path / "d.yaml", "epochs: [1\n")
    with pytest.raises(MtlError, match=r"d\.yaml:\d+: invalid YAML"):
        load_config_file(bad)
    bad = write_file(tmp_path / "e.yaml", "epoch: 3\n")
    with pytest.raises(MtlError, match=r"e\.yaml: unknown option\(s\) epoch"):
        load_config_file(bad)


@pytest.mark.parametrize(
    "config,file,content,message",
    [
        ({"type": "tagging", "tokens_column": "w", "label_column": "t"}, "a.jsonl",
         '{"w": ["a", "b"], "t": ["O"]}\n', r"a\.jsonl:1: 2 words but 1 tags"),
        ({"type": "similarity", "text_columns": ["a", "b"], "label_column": "s"}, "a.csv",
         "a,b,s\nx,y,1\nx,y,high\n", r"a\.csv:3: score 'high' is not a number"),
        ({"type": "pair_classification", "text_columns": ["a", "b"], "label_column": "l"}, "a.csv",
         "a,b,l\nx,y,yes\nx,,no\n", r"a\.csv:3: empty text in column 'b'"),
        ({"type": "multilabel", "label_column": "l", "labels": ["x", "y"], "text_column": "text"}, "a.jsonl",
         '{"text": "t", "l": ["x"]}\n{"text": "u", "l": ["z"]}\n', r"a\.jsonl:2: label 'z' not in the labels"),
    ],
)  # fmt: skip
def test_bad_rows_of_each_type_name_file_line_and_reason(tmp_path, config, file, content, message):
    (tmp_path / file).write_text(content)
    with pytest.raises(BadRows, match=message):
        load_tasks([TaskConfig("t", str(tmp_path / file), **config)])
