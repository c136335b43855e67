"""Using a model: ``load_encoder`` -> :class:`SentenceEncoder` (``encode``) for a pretrained
encoder, ``load`` -> :class:`Predictor` (``predict``, ``predict_proba``, ``encode``) for a
trained model exported by the trainer.

Sentences are packed several to a row (``mtl_jax.data.packing``) and each compiled call holds
about ``batch_size`` sentences' tokens, so one input compiles a handful of shapes at most.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mtl_jax.data.packing import MAX_SEGMENTS, packed_calls
from mtl_jax.data.text import TextTokenizer, check_texts
from mtl_jax.errors import MtlError
from mtl_jax.model.multitask import MultiTaskModel, l2_normalize
from mtl_jax.model.pretrained import POOLING_MODES, EncoderSpec, load_pretrained
from mtl_jax.outputs.export import verify_export
from mtl_jax.tasks import from_export


@dataclass
class SentenceEncoder:
    """A pretrained encoder ready to embed sentences: config + params, tokenizer, pooling."""

    spec: EncoderSpec
    params: Any  # FlaxDistilBertModule params
    hf_tokenizer: Any  # transformers PreTrainedTokenizerFast
    source: Path | None = None
    _tokenizer: TextTokenizer = field(init=False, repr=False)

    def __post_init__(self):
        self._tokenizer = TextTokenizer.from_hf(self.hf_tokenizer, lowercase=self.spec.lowercase)

    @property
    def config(self):
        return self.spec.config

    @property
    def dim(self) -> int:
        return self.spec.config.dim

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @functools.cached_property
    def _embed_fn(self):
        @functools.partial(jax.jit, static_argnames=("pooling", "normalize"))
        def embed(params, ids, positions, segments, pooling, normalize):
            model = MultiTaskModel(self.config, tasks=(), pooling=pooling)
            pooled = model.apply(
                {"params": {"encoder": params}},
                ids,
                positions,
                segments,
                MAX_SEGMENTS,
                method=MultiTaskModel.embed_packed,
            )
            return l2_normalize(pooled) if normalize else pooled

        return embed

    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 64,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Embeddings ``[N, D]`` float32, rows in input order.

        Pooling, normalization and ``max_length`` default to the checkpoint's settings.
        ``batch_size`` sets the work per compiled call: about ``batch_size`` × 24 tokens
        (sentences are packed several to a row, see ``mtl_jax.data.packing``).
        """
        pooling = pooling or self.spec.pooling
        if pooling not in POOLING_MODES:
            raise MtlError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
        normalize = self.spec.normalize if normalize is None else normalize
        fn = functools.partial(self._embed_fn, self.params, pooling=pooling, normalize=normalize)
        out = self.map_packed(
            fn,
            sentences,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
            empty=np.zeros((0, self.dim), np.float32),
        )
        return out.astype(np.float32, copy=False)

    def map_packed(
        self,
        fn,
        sentences: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        progress: bool | None = None,
        empty=None,
    ):
        """``fn(ids, positions, segments) -> pytree of [R, MAX_SEGMENTS, ...]`` over all sentences,
        packed several to a row (``mtl_jax.data.packing``); one output row per sentence, in input order.

        One input compiles two shapes at most (``packing.row_lengths``; inputs of only a few
        rows use fewer rows per call, a power of two).
        ``progress=None`` shows a bar only on a terminal for long inputs.
        """
        texts = check_texts(sentences)
        max_length = max_length or self.spec.max_length
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise MtlError(f"max_length {max_length} must be in [2, {self.config.max_position_embeddings}]")
        if batch_size < 1:
            raise MtlError(f"batch_size must be positive, got {batch_size}")
        if not texts and empty is not None:
            return empty
        ids, _ = self._tokenizer(texts, max_length)
        if progress is None:
            progress = sys.stderr.isatty() and len(texts) >= 10 * batch_size
        out = None
        pending = []

        def collect(call, result):
            nonlocal out
            result = jax.tree.map(lambda r: np.asarray(r).reshape((-1,) + r.shape[2:]), result)
            if out is None:
                out = jax.tree.map(lambda r: np.zeros((len(texts),) + r.shape[1:], r.dtype), result)
            slots = np.flatnonzero(call.index >= 0)
            jax.tree.map(lambda o, r: o.__setitem__(call.index[slots], r[slots]), out, result)

        with tqdm(total=len(texts), unit="sent", disable=not progress, desc="encode") as bar:
            for call in packed_calls(ids, batch_size, self._tokenizer.pad_id):
                pending.append((call, fn(call.ids, call.positions, call.segments)))
                if len(pending) > 2:  # keep the device busy while the host packs the next call
                    collect(*pending.pop(0))
                bar.update(call.sentences)
            for item in pending:
                collect(*item)
        return out


def load_encoder(
    name_or_path: str | Path = "sentence-transformers/all-MiniLM-L6-v2", allow_pickle: bool = False
) -> SentenceEncoder:
    """A :class:`SentenceEncoder` for the embedded model, a local checkpoint directory, or a hub name."""
    spec, params, tokenizer, folder = load_pretrained(name_or_path, allow_pickle=allow_pickle)
    return SentenceEncoder(spec, params, tokenizer, source=folder)


class Predictor:
    """A trained multi-task model: ``predict()`` per task labels and probabilities, ``encode()`` embeddings."""

    def __init__(self, folder: Path):
        from safetensors.numpy import load_file

        meta = verify_export(folder)
        self.folder = Path(folder)
        self.task_objects = tuple(from_export(t) for t in meta["tasks"])
        self.tasks = [(t.name, t.labels) for t in self.task_objects]
        self.encoder = load_encoder(folder)
        dim = self.encoder.dim
        raw = load_file(str(self.folder / "heads.safetensors"))
        heads = {}
        for task in self.task_objects:
            name = task.name
            want = {"kernel": (dim, task.outputs), "bias": (task.outputs,)}
            heads[name] = {}
            for k, shape in want.items():
                arr = raw.get(f"{name}.{k}")
                if arr is None or tuple(arr.shape) != shape:
                    got = None if arr is None else tuple(arr.shape)
                    raise MtlError(f"{self.folder / 'heads.safetensors'}: {name}.{k} has shape {got}, expected {shape}")
                heads[name][k] = arr
        self.params = {"encoder": self.encoder.params, "heads": jax.tree.map(jax.numpy.asarray, heads)}
        self.model = MultiTaskModel(
            self.encoder.config, tasks=tuple((t.name, t.outputs) for t in self.task_objects), pooling=meta["pooling"]
        )

        @jax.jit
        def probs(params, ids, positions, segments):
            def run(model: MultiTaskModel):
                return model.classify(model.embed_packed(ids, positions, segments, MAX_SEGMENTS))

            logits = self.model.apply({"params": params}, method=run)
            return {t.name: t.probabilities(logits[t.name]) for t in self.task_objects}

        self._probs = probs

    def encode(self, sentences, **kw) -> np.ndarray:
        return self.encoder.encode(sentences, **kw)

    def predict_proba(self, sentences, batch_size: int = 64, progress: bool | None = None) -> dict[str, np.ndarray]:
        """Per task ``[N, C]`` class probabilities (each task's :meth:`~mtl_jax.tasks.Task.probabilities`), rows in input order."""
        empty = {t.name: np.zeros((0, t.outputs), np.float32) for t in self.task_objects}
        out = self.encoder.map_packed(
            functools.partial(self._probs, self.params),
            sentences,
            batch_size=batch_size,
            progress=progress,
            empty=empty,
        )
        return {name: out[name] for name, _ in self.tasks}

    def predict(self, sentences, batch_size: int = 64, progress: bool | None = None) -> list[dict]:
        """Per input, each task's output (:meth:`~mtl_jax.tasks.Task.output`; classification: a
        ``Prediction`` with the label and the class probabilities)."""
        probs = self.predict_proba(sentences, batch_size=batch_size, progress=progress)
        n = len(next(iter(probs.values()))) if probs else 0
        return [{t.name: t.output(probs[t.name][i]) for t in self.task_objects} for i in range(n)]


def load(path: str | Path) -> Predictor:
    """Load an exported model directory (``<run>/export``)."""
    return Predictor(Path(path))
