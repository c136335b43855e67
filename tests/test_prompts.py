"""Prompts: a text per column put before its texts in training, evaluation, predict and encode, kept in
the export as sentence-transformers' prompts, whose ``encode(prompt_name=...)`` gives our vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtl_jax import load
from mtl_jax.config import load_config_file
from mtl_jax.data import store
from mtl_jax.errors import MtlError
from mtl_jax.inference import load_encoder
from mtl_jax.tasks import TaskConfig, build
from mtl_jax.tasks.metrics import unit_rows
from tests.helpers import cli, torch_vectors
from tests.typed_data import write_typed_data

PROMPTED = """\
tasks:
  - name: qa
    type: retrieval
    train: qa.jsonl
    text_columns: [query, answer]
    negatives_column: negatives
    prompts: {query: "query: ", answer: "passage: ", negatives: "passage: "}
  - name: topic
    train: topic.csv
    prompts: {text: "topic of: "}
"""


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory, tiny_bert):
    folder = write_typed_data(tmp_path_factory.mktemp("prompted"))
    (folder / "prompted.yaml").write_text(PROMPTED)
    out = folder / "run"
    args = ["--config", str(folder / "prompted.yaml"), "--encoder", str(tiny_bert), "--out", str(out)]
    r = cli("train", *args, "--batch-size", "16", "--max-steps", "3", "--no-progress", "--data-cache", "off")
    assert r.returncode == 0, r.stderr[-3000:]
    return folder, out


def test_training_texts_start_with_their_columns_prompts(prompted_run, tiny_bert):
    folder, _ = prompted_run
    tasks = load_config_file(folder / "prompted.yaml")["task_list"]
    tokenizer = load_encoder(str(tiny_bert)).tokenizer
    data = store.prepare(tasks, tokenizer, store.data_key(tasks, tokenizer, 64, 0, False), "off")
    rows = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines()]
    train = data.splits["train"]
    qa = np.flatnonzero(train.labels["qa"][:, 0] >= 0)
    first = train.ids[int(qa[0])]  # query, answer, negatives: each behind its prompt
    texts = {tuple(tokenizer([f"query: {r['query']}"], 64)[0][0]): r for r in rows}
    row = texts[tuple(first[0])]
    assert list(first[1]) == list(tokenizer([f"passage: {row['answer']}"], 64)[0][0])
    for seg, negative in zip(first[2:], row["negatives"], strict=True):
        assert list(seg) == list(tokenizer([f"passage: {negative}"], 64)[0][0])


@pytest.mark.parametrize("venv", [".peer/venv", pytest.param(".peer/st6", marks=pytest.mark.slow)])  # st6: test-slow
def test_sentence_transformers_prompt_names_give_our_prompted_vectors(prompted_run, venv):
    _, out = prompted_run
    model = load(out / "export")
    assert model.encoder.prompts == {
        "query": "query: ",
        "answer": "passage: ",
        "negatives": "passage: ",
        "text": "topic of: ",
    }
    sentences = ["who alice vote", "alice likes the vote 3", ""]
    got = torch_vectors(out / "export", sentences, venv)
    for name, text in model.encoder.prompts.items():
        ours = model.encode(sentences, prompt_name=name)
        np.testing.assert_allclose(ours, model.encode([text + s for s in sentences]), atol=1e-6)
        np.testing.assert_allclose(got["prompted"][name], ours, atol=1e-5, rtol=0, err_msg=f"{name} {got['versions']}")
    assert not np.allclose(model.encode(sentences, prompt_name="query"), model.encode(sentences), atol=1e-3)
    # predict: a query behind the query prompt, a passage of --corpus behind the passage prompt
    query = model.predict_proba(sentences)["qa"]
    passage = model.predict_proba(sentences, corpus=True)["qa"]
    np.testing.assert_allclose(query, unit_rows(model.encode(sentences, prompt_name="query")), atol=1e-5)
    np.testing.assert_allclose(passage, unit_rows(model.encode(sentences, prompt_name="answer")), atol=1e-5)
    with pytest.raises(MtlError, match="no prompt named 'passage'"):
        model.encode(sentences, prompt_name="passage")


def test_a_prompt_for_a_column_a_task_does_not_read_or_two_texts_for_one_column_are_refused(tmp_path):
    with pytest.raises(MtlError, match="prompts for answer, not a text column"):
        build(TaskConfig("t", "x.csv", prompts={"answer": "a: "}))
    (tmp_path / "c.yaml").write_text('tasks:\n  - name: t\n    train: t.csv\n    prompts: ["a: "]\n')
    with pytest.raises(MtlError, match=r"c.yaml: tasks\[0\]: prompts: expected a mapping of column to prompt text"):
        load_config_file(tmp_path / "c.yaml")
    from mtl_jax.tasks.base import prompts_of

    a = build(TaskConfig("a", "x.csv", prompts={"text": "a: "}))
    b = build(TaskConfig("b", "y.csv", prompts={"text": "b: "}))
    with pytest.raises(MtlError, match="task b: prompt 'b: ' for column 'text', another task has 'a: '"):
        prompts_of([a, b])
