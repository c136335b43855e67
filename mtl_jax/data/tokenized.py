"""A split's tokenized examples (:class:`Tokenized`): what the store reads back, the plans deal
and the batches pack."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mtl_jax.data.packing import StoredUnits, drop_pages, pack_length, row_lengths, unit_length, unit_segments
from mtl_jax.tasks.base import has_label


@dataclass
class Tokenized:
    ids: list | StoredUnits  # per example: token ids (an array, or a tuple of arrays: its segments)
    labels: dict[str, np.ndarray]  # task -> [N, ...]; a token-level task: [N] object, ids per token (-1: none)
    source: np.ndarray  # [N]
    truncated: int
    embeddings: np.ndarray | None = None  # [N, segments, D] cached pooled embeddings of a frozen encoder

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        if isinstance(self.ids, StoredUnits):
            return self.ids.lengths
        return np.fromiter((unit_length(s) for s in self.ids), np.int64, len(self.ids))

    def release(self) -> None:
        """Let the pages of its memory-mapped arrays (a store's) go: reads scattered over a large split
        would otherwise keep nearly all of it mapped in."""
        if isinstance(self.ids, StoredUnits):
            self.ids.release()
        for a in (self.source, *self.labels.values()):
            drop_pages(a)

    def take(self, idx: np.ndarray) -> Tokenized:
        """Examples ``idx`` (in that order) as a split of their own."""
        emb = None if self.embeddings is None else self.embeddings[idx]
        labels = {k: v[idx] for k, v in self.labels.items()}
        return Tokenized([self.ids[i] for i in idx], labels, self.source[idx], self.truncated, emb)

    def sample(self, per_task: int, seed: int) -> Tokenized:
        """At most ``per_task`` labelled examples of each task (a seeded sample, in the split's order)."""
        rng = np.random.default_rng([seed, 13])
        chosen = [m if len(m) <= per_task else rng.choice(m, per_task, replace=False) for m in task_members(self)]
        return self.take(np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64))

    @functools.cached_property
    def longest(self) -> int:
        """The most tokens an example has (read at every step: computed once)."""
        return int(self.lengths.max()) if len(self.ids) else 1

    @functools.cached_property
    def short_rows(self) -> int:
        """The row length short examples share (``packing.pack_length``)."""
        return row_lengths(self.longest, pack_length(self.lengths, self.widest))[0]

    @functools.cached_property
    def widest(self) -> int:
        """The most segments an example has."""
        if isinstance(self.ids, StoredUnits):
            return self.ids.widest
        return max((len(unit_segments(s)) for s in self.ids), default=1)


def task_members(data: Tokenized) -> list[np.ndarray]:
    """Per task, the examples that carry its label."""
    return [np.flatnonzero(has_label(y)) for y in data.labels.values()]
