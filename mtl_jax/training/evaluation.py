"""Host-side loops over every example of a split: metrics per task, and pooled embeddings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mtl_jax.data.batching import InputPipeline, Tokenized
from mtl_jax.tasks import Task
from mtl_jax.training.parallel import to_host


def _over_examples(fn: Callable, params, pipeline: InputPipeline, data: Tokenized, bar=None) -> list:
    """``[(example index per slot (-1: empty), fn(params, batch))]``; results stay on the device until read."""
    out = []
    for index, arrays in pipeline.eval_batches(data):
        out.append((index, fn(params, arrays)))
        if bar is not None:
            bar.update(int((index >= 0).sum()))
    return out


def embed_all(embed_step: Callable, params, pipeline: InputPipeline, data: Tokenized, bar=None) -> np.ndarray:
    """Pooled embeddings ``[N, D]`` float32 of every example of ``data``, in its order."""
    out = None
    for index, pooled in _over_examples(embed_step, params, pipeline, data, bar):
        pooled = to_host(pooled)
        if out is None:
            out = np.zeros((len(data), pooled.shape[1]), np.float32)
        keep = index >= 0
        out[index[keep]] = pooled[keep]
    return out if out is not None else np.zeros((0, 0), np.float32)


def evaluate(eval_step: Callable, params, pipeline: InputPipeline, data: Tokenized, tasks: Sequence[Task]) -> dict:
    """Each task's metrics (:meth:`Task.metrics`) and mean loss over every labelled example of ``data``
    exactly once (padding never counts). ``data`` may carry cached embeddings (then only the heads run)."""
    names = [t.name for t in tasks]
    preds = np.full((len(data), len(tasks)), -1, np.int64)
    loss_sums = dict.fromkeys(names, 0.0)
    for index, result in _over_examples(eval_step, params, pipeline, data):
        p, losses = to_host(result)
        keep = index >= 0
        for ti, t in enumerate(names):
            preds[index[keep], ti] = np.asarray(p[t])[keep]
            loss_sums[t] += float(losses[t])
    out = {}
    for ti, task in enumerate(tasks):
        has = data.labels[:, ti] >= 0
        report = task.metrics(data.labels[has, ti], preds[has, ti])
        report["loss"] = loss_sums[task.name] / max(int(has.sum()), 1)
        out[task.name] = report
    return out
