"""Host-side loops over every example of a split: metrics per task, and pooled embeddings."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from mtl_jax.data.batching import InputPipeline
from mtl_jax.data.packing import slot_values
from mtl_jax.data.tokenized import Tokenized
from mtl_jax.tasks import Task
from mtl_jax.tasks.base import has_label
from mtl_jax.training.parallel import to_host

AHEAD = 2  # batches queued on the device beyond the one the host is reading


def _over_examples(fn: Callable, params, pipeline: InputPipeline, data: Tokenized, bar=None) -> Iterator:
    """``(layout, fn(params, batch))`` per batch, in order (see :meth:`InputPipeline.eval_batches`): the
    device computes the next :data:`AHEAD` batches while the host reads one, and no more results than
    that wait on the device (a split of any size: memory of a few batches)."""
    waiting: deque = deque()
    for call, arrays in pipeline.eval_batches(data):
        waiting.append((call, fn(params, arrays)))
        if bar is not None:
            bar.update(int(call.first.sum()))
        if len(waiting) > AHEAD:
            yield waiting.popleft()
    yield from waiting


def embed_all(embed_step: Callable, params, pipeline: InputPipeline, data: Tokenized, bar=None) -> np.ndarray:
    """Pooled embeddings ``[N, segments, D]`` float32 of every example of ``data`` (each of its
    segments), in its order."""
    out = None
    for call, pooled in _over_examples(embed_step, params, pipeline, data, bar):
        pooled = to_host(pooled)
        pooled = pooled.reshape(-1, pooled.shape[-1])
        if out is None:
            out = np.zeros((len(data), data.widest, pooled.shape[1]), np.float32)
        keep = call.index >= 0
        out[call.index[keep], call.part[keep]] = pooled[keep]
    return out if out is not None else np.zeros((0, data.widest, 0), np.float32)


def evaluate(
    eval_step: Callable, params, pipeline: InputPipeline, data: Tokenized, tasks: Sequence[Task], bar=None
) -> dict:
    """Each task's metrics (:meth:`Task.metrics`) and mean loss over every labelled example of ``data``
    exactly once (padding never counts), accumulated batch by batch (:meth:`Task.add_to_metrics`:
    a classification task keeps its confusion matrix, nothing per example). ``data`` may carry cached embeddings (then only the heads run).
    ``bar``: a progress bar the examples are counted on as their batches are queued."""
    states = {t.name: t.metric_state() for t in tasks}  # (a classification task: its confusion matrix)
    labelled = {t.name: has_label(data.labels[t.name]) for t in tasks}
    loss_sums = {t.name: 0.0 for t in tasks}
    counts = {t.name: 0 for t in tasks}
    for call, result in _over_examples(eval_step, params, pipeline, data, bar):
        p, losses = to_host(result)
        first = np.flatnonzero(call.first)  # the slots that hold an example's first segment
        idx = call.index[first]
        for t in tasks:
            keep = labelled[t.name][idx]
            if keep.any():
                values = slot_values(call, first[keep], np.asarray(p[t.name]), data.lengths, t.token_level)
                y = data.labels[t.name][idx[keep]]
                states[t.name] = t.add_to_metrics(states[t.name], idx[keep], y, values)
            loss_sums[t.name] += float(losses[t.name].loss_sum)
            counts[t.name] += int(losses[t.name].count)
    out = {}
    for task in tasks:
        report = task.finish_metrics(states[task.name], data.labels[task.name][:0])
        report["loss"] = loss_sums[task.name] / max(counts[task.name], 1)
        report["primary"] = task.primary
        out[task.name] = report
    return out
