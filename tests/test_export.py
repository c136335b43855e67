"""The export and predict: a trained run's exported model, loaded by mtl_jax, by PyTorch and by
predict.py, gives the run's own numbers; a damaged export is refused."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtl_jax import MtlError, load
from tests.helpers import ROOT, assert_export_reproduces_test_metrics, cli, torch_vectors
from tests.test_cli import run


def test_export_round_trip_reproduces_test_metrics(reference):
    predictor = assert_export_reproduces_test_metrics(reference)
    # the exported encoder is a plain checkpoint directory too
    emb = predictor.encode(["a sports story"])
    assert emb.shape == (1, predictor.encoder.dim)


def test_export_with_missing_or_altered_file_is_refused(tmp_path, reference):
    d = tmp_path / "export"
    shutil.copytree(reference / "export", d)
    heads = d / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-1] ^= 0xFF
    heads.write_bytes(bytes(data))
    with pytest.raises(MtlError, match=r"heads\.safetensors: altered or corrupted"):
        load(d)
    shutil.copy(reference / "export" / "heads.safetensors", heads)
    (d / "tokenizer.json").unlink()
    with pytest.raises(MtlError, match=r"tokenizer\.json: missing from the exported model"):
        load(d)
    shutil.copy(reference / "export" / "tokenizer.json", d / "tokenizer.json")
    # shapes are checked against the config even when the checksums were updated to match
    raw = load_file(str(heads))
    raw["topic.kernel"] = raw["topic.kernel"][:, :2]
    save_file(raw, str(heads))
    meta = json.loads((d / "mtl_jax.json").read_text())
    import hashlib

    meta["files"]["heads.safetensors"] = hashlib.sha256(heads.read_bytes()).hexdigest()
    (d / "mtl_jax.json").write_text(json.dumps(meta))
    with pytest.raises(MtlError, match=r"topic\.kernel has shape \(32, 2\), expected \(32, 3\)"):
        load(d)


def test_predict_cli_input_forms_and_errors(tmp_path, reference):
    model = str(reference / "export")
    r = run("predict.py", "--model", model, "a vote in the senate", "great fun")  # the script itself, once
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["a vote in the senate", "great fun"]
    assert set(rows[0]["topic"]["probs"]) == {"politics", "sports", "tech"}
    assert rows[0]["topic"]["label"] == max(rows[0]["topic"]["probs"], key=rows[0]["topic"]["probs"].get)
    probs = load(model).predict_proba(["a vote in the senate", "great fun"])
    got = np.asarray([[row["topic"]["probs"][c] for c in ("politics", "sports", "tech")] for row in rows])
    np.testing.assert_allclose(got, probs["topic"], rtol=1e-6)
    (tmp_path / "s.txt").write_text("a vote in the senate\ngreat fun\n")
    assert cli("predict", "--model", model, "--input", str(tmp_path / "s.txt")).stdout == r.stdout
    (tmp_path / "s.csv").write_text('id,body\n1,"a vote in the senate"\n2,great fun\n')
    r3 = cli("predict", "--model", model, "--input", str(tmp_path / "s.csv"), "--text-column", "body")
    assert r3.stdout == r.stdout
    assert cli("predict", "--model", model, stdin="a vote in the senate\ngreat fun\n").stdout == r.stdout
    r5 = cli("predict", "--model", model, "--format", "table", "great fun")
    assert r5.returncode == 0 and "topic" in r5.stdout.splitlines()[0] and "great fun" in r5.stdout
    # bfloat16: the same probabilities to bf16's precision
    r6 = cli("predict", "--model", model, "--dtype", "bfloat16", "a vote in the senate", "great fun")
    got16 = [
        [json.loads(line)["topic"]["probs"][c] for c in ("politics", "sports", "tech")]
        for line in r6.stdout.splitlines()
    ]
    np.testing.assert_allclose(got16, probs["topic"], atol=2e-2)
    # bad input: status 2, one line naming the file / line / flag, nothing on stdout
    errors = {
        "none: no such model directory": ["--model", str(tmp_path / "none"), "x"],
        "give sentences as arguments or --input, not both": ["--model", model, "x", "--input", str(tmp_path / "s.txt")],
        f"{tmp_path / 's.csv'}:1: no column 'text' (columns: id, body)": [
            "--model",
            model,
            "--input",
            str(tmp_path / "s.csv"),
        ],
        "missing.txt: file not found": ["--model", model, "--input", str(tmp_path / "missing.txt")],
        "batch_size must be positive, got 0": ["--model", model, "--batch-size", "0", "x"],
    }
    for missing in ("mtl_jax.json", "model.safetensors"):  # an export missing its metadata or its weights
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(model, broken)
        (broken / missing).unlink()
        errors[
            f"{broken / missing}: missing"
            if missing == "mtl_jax.json"
            else f"{missing}: missing from the exported model"
        ] = [
            "--model",
            str(broken),
            "x",
        ]
    for message, args in errors.items():
        r = cli("predict", *args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr, (args, r)


@pytest.mark.parametrize(
    "venv",
    # sentence-transformers 5 + transformers 4.57; 6 + transformers 5 (make peer; the second in make test-slow)
    [".peer/venv", pytest.param(".peer/st6", marks=pytest.mark.slow)],
)
def test_pytorch_loads_the_export_with_the_same_vectors(reference, venv):
    """sentence-transformers and plain AutoModel/AutoTokenizer give our vectors (truncation included),
    of sentences and of cross-encoded pairs (the second text's BERT token type included)."""
    sentences = ["a vote in the senate", "great fun", "", "café naïve — 東京 🙂", " ".join(["word"] * 300)]
    pairs = [["a vote in the senate", "great fun"], ["café naïve", "東京 🙂 " * 200]]  # (one cut at the limit)
    model = load(reference / "export")
    for texts in (sentences, pairs):
        got = torch_vectors(reference / "export", texts, venv)
        assert got["inputs"] == ["attention_mask", "input_ids", "token_type_ids"]  # a BERT export: pairs' types
        want = model.encode(texts)
        for side in ("st", "auto"):
            np.testing.assert_allclose(got[side], want, atol=1e-5, rtol=0, err_msg=f"{side} {got['versions']}")


@pytest.mark.slow  # the embedded encoder trained a step and exported, then sentence-transformers: make test-slow
def test_retrieval_figures_equal_sentence_transformers_information_retrieval_evaluator(tmp_path):
    """On a fixture with a passage written twice, a query with two positives and hard negatives in the
    corpus, the test figures a run reports equal those InformationRetrievalEvaluator computes from its
    export (1e-3)."""
    topics = ["football", "elections", "microchips", "gardening", "jazz", "volcanoes", "chess", "baking"]
    rows = [(f"tell me about {t}", f"an article on {t}, number {i}") for i, t in enumerate(topics * 3)]
    rows += [(rows[0][0], "more on football and its leagues")]  # a query with two positives
    rows += [("which article covers molten rock?", rows[5][1])]  # a passage written twice
    rows += [
        (f"question number {i}", f"a note about {topics[(3 * i) % 8]} and {topics[(5 * i) % 8]}") for i in range(6)
    ]
    negatives = ("please tell me about football", rows[9][1], "tell me all about microchips")
    rows = [r + (n,) for r, n in zip(rows, negatives)] + rows[3:]  # hard negatives join the ranked corpus:
    # texts of their own that look like the queries (they outrank the positives), another row's positive
    lines = "".join(json.dumps(dict(zip(("query", "positive", "negative"), r))) + "\n" for r in rows)
    (tmp_path / "qa.jsonl").write_text(lines)
    qa = tmp_path / "qa.jsonl"
    (tmp_path / "t.yaml").write_text(
        f"tasks:\n  - name: qa\n    type: retrieval\n    train: {qa}\n    validation: {qa}\n    test: {qa}\n"
        "    text_columns: [query, positive, negative]\n"
    )
    out = tmp_path / "run"
    args = ["--config", str(tmp_path / "t.yaml"), "--freeze", "all", "--max-steps", "1", "--batch-size", "8"]
    r = cli("train", *args, "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    ours = json.loads((out / "summary.json").read_text())["test"]["qa"]
    python = ROOT / ".peer" / "venv" / "bin" / "python"
    theirs = subprocess.run(
        [str(python), str(ROOT / "tests" / "torch_ir.py"), str(out / "export")],
        input=json.dumps(rows), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    st = json.loads(theirs.stdout)
    assert ours["examples"] == 15  # distinct queries (eight topics asked three times each, seven more)
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "map@100"):
        assert ours[name] == pytest.approx(st[name], abs=1e-3), (name, ours[name], st[name])
    assert 0 < st["ndcg@10"] < 1


@pytest.mark.slow  # a cross-encoder trained a few steps and exported, then sentence-transformers: make test-slow
def test_cross_encoded_pair_scores_equal_the_export_read_by_sentence_transformers(tmp_path, tiny_bert):
    """A cross-encoded pair task trained on a BERT encoder: predict's class probabilities equal the
    export's head over the pair embeddings sentence-transformers computes (its pairs carry BERT's token
    types); those embeddings are not the two texts' joined into one sentence."""
    from tests.typed_data import write_typed_data

    data = write_typed_data(tmp_path)
    (tmp_path / "t.yaml").write_text(
        f"tasks:\n  - name: nli\n    type: pair_classification\n    train: {data / 'pairs.jsonl'}\n"
        "    text_columns: [premise, hypothesis]\n    encoding: cross\n"
    )
    out = tmp_path / "run"
    r = cli("train", "--config", str(tmp_path / "t.yaml"), "--encoder", str(tiny_bert), "--max-steps", "4",
            "--lr", "1e-3", "--out", str(out), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()[:6]]
    pairs = [[row["premise"], row["hypothesis"]] for row in rows]
    ours = load(out / "export").predict_proba(pairs)["nli"]
    heads = load_file(str(out / "export" / "heads.safetensors"))
    pooled = torch_vectors(out / "export", pairs)["st"]
    logits = pooled @ heads["nli.kernel"] + heads["nli.bias"]
    theirs = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(ours, theirs / theirs.sum(-1, keepdims=True), atol=1e-5, rtol=0)
    joined = load(out / "export").encode([" ".join(p) for p in pairs])  # (no second segment at all)
    assert np.abs(joined - pooled).max() > 1e-3
