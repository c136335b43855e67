"""``tagging``: a tag per word (named entities, parts of speech).

Rows hold a list of words and a list of tags (JSONL, Parquet, ``datasets`` folders; a CSV cell is
split on whitespace) or come from a CoNLL file (``format: conll``). Each word is labelled on its
first sub-token; a per-token Dense head over the encoder's token states is trained with
cross-entropy over the labelled tokens. Words cut off by ``--max-length`` are not scored.

Metrics: token accuracy; for BIO / IOB2 / IOBES tags also entity precision, recall and F1 as
seqeval's default mode counts them (the primary score; else token accuracy is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from mtl_jax.data.text import Words
from mtl_jax.model.heads import Features, HeadSpec, dense_head
from mtl_jax.options import option
from mtl_jax.tasks.base import BadText, Task, register
from mtl_jax.tasks.classification import Classification
from mtl_jax.tasks.metrics import entity_scores


def as_list(raw) -> tuple:
    """A list-valued cell: a JSON list as read, or a text split on whitespace."""
    return raw if isinstance(raw, tuple) else tuple(str(raw).split())


@dataclasses.dataclass(frozen=True)
class TaggingOptions:
    tokens_column: str = option("tokens", "the column holding each row's words (a list)")


@register("tagging")
@dataclasses.dataclass(frozen=True)
class Tagging(Classification):
    record_keys = ("loss", "token_accuracy", "entity_f1", "examples")
    token_level = True
    label_dtype = object
    Options = TaggingOptions
    numeric = False  # tags are read as text, whatever they look like

    @property
    def primary(self) -> str:
        return "entity_f1" if self.entities else "token_accuracy"

    @property
    def entities(self) -> bool:
        """Whether the tags mark entities (BIO / IOB2 / IOBES prefixes)."""
        return any(t[:2] in ("B-", "I-", "E-", "S-") for t in self.labels)

    @property
    def text_kind(self) -> str:
        return "words"

    def text_columns(self) -> tuple[str, ...]:
        return (self.options.tokens_column,)

    def text(self, fields: dict):
        words = as_list(fields.get(self.options.tokens_column) or ())
        if not words or any(w is None for w in words):
            return BadText(f"no words in column {self.options.tokens_column!r}")
        return Words(words)

    def accepts(self, value) -> bool:
        return isinstance(value, str)  # its words: split on whitespace

    def input_text(self, value):
        return Words(as_list(value))

    def with_labels(self, raw_train_labels: Iterable) -> Tagging:
        if self.labels:
            return self
        return dataclasses.replace(self, labels=tuple(sorted({t for raw in raw_train_labels for t in as_list(raw)})))

    def label_id(self, raw) -> np.ndarray | str:
        ids = [super(Tagging, self).label_id(t) for t in as_list(raw)]
        bad = [i for i in ids if isinstance(i, str)]
        return bad[0] if bad else np.asarray(ids, np.int32)

    def check_row(self, text, raw) -> str | None:
        tags = as_list(raw)
        if len(text) != len(tags):
            return f"{len(text)} words but {len(tags)} tags"
        return None

    def check_train(self, y: np.ndarray) -> None:
        super().check_train(np.concatenate(list(y)) if len(y) else np.zeros(0, np.int32))

    def strata(self, y: np.ndarray) -> np.ndarray:
        return np.zeros(len(y), np.int64)

    @staticmethod
    def head(spec: HeadSpec, features: Features):
        return dense_head(spec, features.tokens)  # [R, P, tags]

    # (entity figures need each sentence's tags: evaluation keeps the examples, not a confusion matrix)
    metric_state, add_to_metrics, finish_metrics = Task.metric_state, Task.add_to_metrics, Task.finish_metrics

    def metrics(self, y_true, y_pred) -> dict:
        """Over the labelled tokens (each word's first sub-token) of every sentence."""
        true = [[self.labels[i] for i in y[y >= 0]] for y in y_true]
        pred = [[self.labels[i] for i in p[y >= 0]] for y, p in zip(y_true, y_pred)]
        right = sum(int(np.sum(np.asarray(t) == np.asarray(p))) for t, p in zip(true, pred))
        words = sum(len(t) for t in true)
        out = {"token_accuracy": right / words if words else 0.0, "words": words, "examples": len(true)}
        no_entities = dict.fromkeys(("entity_precision", "entity_recall", "entity_f1"), 0.0)
        return out | (entity_scores(true, pred) if self.entities else no_entities)

    def describe(self, result: dict) -> str:
        ent = f" entity F1 {result['entity_f1']:.3f}" if self.entities else ""
        return f"token acc {result['token_accuracy']:.3f}{ent}"

    def report_lines(self, summary: dict) -> list[str]:
        columns = (("token accuracy", "token_accuracy"), ("entity P", "entity_precision"))
        columns += (("entity R", "entity_recall"), ("entity F1", "entity_f1"))
        return self.split_table(summary, columns, count="sentences")

    def plots(self, result: dict, folder) -> list[str]:
        return []

    def values(self, logits):
        import jax

        return jax.nn.softmax(logits, axis=-1)

    def output_json(self, output: list[str]) -> list[str]:
        return output

    def output_cell(self, output: list[str]) -> str:
        return " ".join(output)

    def output(self, values: np.ndarray) -> list[str]:
        return [self.labels[int(i)] for i in np.argmax(values, axis=-1)]
