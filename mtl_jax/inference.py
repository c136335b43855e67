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

from mtl_jax.data.packing import MAX_SEGMENTS, gather, packed_calls, unit_length
from mtl_jax.data.text import Joined, TextTokenizer, check_texts
from mtl_jax.errors import MtlError
from mtl_jax.model.heads import l2_normalize
from mtl_jax.model.multitask import MultiTaskModel, compute_dtype
from mtl_jax.model.pretrained import POOLING_MODES, EncoderSpec, load_pretrained
from mtl_jax.outputs.export import verify_export
from mtl_jax.tasks import from_export
from mtl_jax.tasks.metrics import unit_rows


@dataclass
class SentenceEncoder:
    """A pretrained encoder ready to embed sentences: config + params, tokenizer, pooling."""

    spec: EncoderSpec
    params: Any  # FlaxDistilBertModule params
    hf_tokenizer: Any  # transformers PreTrainedTokenizerFast
    source: Path | None = None
    dtype: str = "float32"  # the encoder computes in float32 or bfloat16; parameters stay float32
    _tokenizer: TextTokenizer = field(init=False, repr=False)

    def __post_init__(self):
        compute_dtype(self.dtype)  # a clear error for an unknown name
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
        @functools.partial(jax.jit, static_argnames=("pooling", "normalize", "pairs"))
        def embed(params, ids, positions, segments, pooling, normalize, pairs=False):
            model = MultiTaskModel(self.config, (), pooling, dtype=compute_dtype(self.dtype), pairs=pairs)
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
        dim: int | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
    ) -> np.ndarray:
        """Embeddings ``[N, D]`` float32, rows in input order; a pair ``(a, b)`` is encoded as one
        sequence, ``[CLS] a [SEP] b [SEP]`` (a cross-encoded pair, as sentence-transformers' ``encode``
        does); ``dim``: the first ``dim`` dimensions only (re-normalised when normalizing), as a
        Matryoshka-trained model's shorter embeddings;
        ``prompt_name`` (one of the model's :attr:`prompts`, as sentence-transformers names them) or
        ``prompt``: a text put before each sentence.

        Pooling, normalization and ``max_length`` default to the checkpoint's settings.
        ``batch_size`` sets the work per compiled call: about ``batch_size`` × 24 tokens
        (sentences are packed several to a row, see ``mtl_jax.data.packing``).
        """
        pooling = pooling or self.spec.pooling
        if pooling not in POOLING_MODES:
            raise MtlError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)}")
        normalize = self.spec.normalize if normalize is None else normalize
        if dim is not None and not 1 <= dim <= self.dim:
            raise MtlError(f"dim {dim} must be in [1, {self.dim}]")
        prefix = self.prompt(prompt_name, prompt)
        texts = check_texts(sentences, pairs=True)
        pairs = any(isinstance(t, Joined) for t in texts)
        if prefix and pairs:
            raise MtlError("a prompt goes before sentences, not pairs: put it into the pair's texts")
        fn = functools.partial(self._embed_fn, self.params, pooling=pooling, normalize=normalize, pairs=pairs)
        out = self.map_packed(
            fn,
            [prefix + s for s in texts] if prefix else texts,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
            empty=np.zeros((0, self.dim), np.float32),
        )
        if dim is not None and dim < self.dim:
            out = out[:, :dim]
            if normalize:
                out = unit_rows(out)
        return np.ascontiguousarray(out, np.float32)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's prompts by name (its config_sentence_transformers.json; an export: its tasks' columns)."""
        return dict(self.spec.prompts)

    def prompt(self, name: str | None, text: str | None = None) -> str:
        """The text of prompt ``name`` (or ``text`` itself); "" for neither."""
        if name is not None and text is not None:
            raise MtlError("give a prompt_name or a prompt, not both")
        if name is None:
            return text or ""
        if name not in self.prompts:
            known = ", ".join(self.prompts) or "none"
            raise MtlError(f"no prompt named {name!r} (the model's prompts: {known})")
        return self.prompts[name]

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
        texts = check_texts(sentences, pairs=True)
        max_length = max_length or self.spec.max_length
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise MtlError(f"max_length {max_length} must be in [2, {self.config.max_position_embeddings}]")
        if batch_size < 1:
            raise MtlError(f"batch_size must be positive, got {batch_size}")
        if not texts and empty is not None:
            return empty
        ids, _ = self._tokenizer(texts, max_length)
        return self.map_units(fn, ids, batch_size, progress, empty)

    def map_units(self, fn, units: Sequence, batch_size: int = 64, progress=None, empty=None, per_token=()):
        """``fn(ids, positions, segments)`` over encoded examples (``units``: token ids, or a tuple of
        an example's segments' ids), packed several to a row: per output its rows at each example's
        first slot, in input order; an output named in ``per_token`` (``[R, P, ...]``) gives each example
        its tokens' rows instead."""
        if not units and empty is not None:
            return empty
        if progress is None:
            progress = sys.stderr.isatty() and len(units) >= 10 * batch_size
        out: dict = {}

        lengths = np.fromiter((unit_length(u) for u in units), np.int64, len(units))

        def collect(call, result):
            for name, r in result.items() if isinstance(result, dict) else [(None, result)]:
                gather(out, name, call, np.asarray(r), lengths, name in per_token)

        pending = []
        with tqdm(total=len(units), unit="sent", disable=not progress, desc="encode") as bar:
            for call in packed_calls(units, batch_size, self._tokenizer.pad_id):
                pending.append((call, fn(call.ids, call.positions, call.segments)))
                if len(pending) > 2:  # keep the device busy while the host packs the next call
                    collect(*pending.pop(0))
                bar.update(int(call.first.sum()))
            for item in pending:
                collect(*item)
        return out[None] if None in out else out


def load_encoder(
    name_or_path: str | Path = "sentence-transformers/all-MiniLM-L6-v2",
    allow_pickle: bool = False,
    dtype: str = "float32",
) -> SentenceEncoder:
    """A :class:`SentenceEncoder` for the embedded model, a local checkpoint directory, or a hub name;
    ``dtype="bfloat16"`` computes in bfloat16 (faster on GPUs, TPUs and CPUs with bf16 instructions;
    embeddings stay float32 arrays)."""
    spec, params, tokenizer, folder = load_pretrained(name_or_path, allow_pickle=allow_pickle)
    return SentenceEncoder(spec, params, tokenizer, source=folder, dtype=dtype)


class Predictor:
    """A trained multi-task model: ``predict()`` each task's output, ``encode()`` embeddings.

    An input is a sentence (the single-sentence types, tagging: its words split on whitespace,
    retrieval: the query's embedding) or a pair ``(a, b)`` (the pair types); each call predicts the
    tasks that take its kind of input.
    """

    def __init__(self, folder: Path, dtype: str = "float32"):
        meta = verify_export(folder)
        self.folder = Path(folder)
        self.task_objects = tuple(from_export(t) for t in meta["tasks"])
        self.tasks = [(t.name, t.labels) for t in self.task_objects]
        self.encoder = load_encoder(folder, dtype=dtype)
        self.model = MultiTaskModel(
            self.encoder.config,
            tasks=tuple(t.head_spec() for t in self.task_objects),
            pooling=meta["pooling"],
            dtype=compute_dtype(dtype),
            normalize=self.encoder.spec.normalize,
        )
        self.params = {"encoder": self.encoder.params, "heads": self._load_heads()}

        @functools.partial(jax.jit, static_argnames="names")
        def probs(params, ids, positions, segments, names):
            out = self.model.apply({"params": params}, ids, positions, segments, MAX_SEGMENTS, method="classify_packed")
            return {t.name: t.values(out[t.name]) for t in self.task_objects if t.name in names}

        self._probs = probs

    def _load_heads(self) -> dict:
        """heads.safetensors, each array checked against the shape the model's heads have."""
        from safetensors.numpy import load_file

        path = self.folder / "heads.safetensors"
        raw = load_file(str(path))
        ids = np.zeros((1, 4), np.int32)
        shapes = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), ids, ids)["params"].get("heads", {})
        heads = {}
        for name, leaves in shapes.items():
            for k, want in leaves.items():
                arr = raw.get(f"{name}.{k}")
                if arr is None or tuple(arr.shape) != tuple(want.shape):
                    got = None if arr is None else tuple(arr.shape)
                    raise MtlError(f"{path}: {name}.{k} has shape {got}, expected {tuple(want.shape)}")
                heads.setdefault(name, {})[k] = jax.numpy.asarray(arr)
        return heads

    def encode(self, sentences, **kw) -> np.ndarray:
        return self.encoder.encode(sentences, **kw)

    def tasks_for(self, inputs: Sequence) -> tuple:
        """The tasks that take inputs of this kind (sentences or pairs)."""
        if not inputs:
            return tuple(t for t in self.task_objects if t.accepts("x"))
        chosen = tuple(t for t in self.task_objects if all(t.accepts(x) for x in inputs))
        if not chosen:
            kinds = "pairs" if isinstance(inputs[0], (tuple, list)) else "sentences"
            raise MtlError(
                f"no task of this model takes {kinds} (tasks: {', '.join(t.name for t in self.task_objects)})"
            )
        return chosen

    def predict_proba(
        self, inputs, batch_size: int = 64, progress: bool | None = None, corpus: bool = False
    ) -> dict[str, np.ndarray]:
        """Per task its :meth:`~mtl_jax.tasks.Task.values` per input (tagging: per word), in input
        order, for the tasks that take these inputs (see :meth:`tasks_for`); ``corpus``: the inputs
        are texts to rank (retrieval: passages, behind the passage column's prompt)."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        if batch_size < 1:
            raise MtlError(f"batch_size must be positive, got {batch_size}")
        out: dict[str, np.ndarray] = {}
        groups: dict[tuple, list] = {}  # tasks that make the same text of an input share a forward pass
        for t in self.tasks_for(inputs):
            as_text = t.corpus_text if corpus else t.input_text
            groups.setdefault((t.input_kind, repr(as_text(inputs[0])) if inputs else ""), []).append(t)
        for tasks in groups.values():
            as_text = tasks[0].corpus_text if corpus else tasks[0].input_text
            encoded = self.encoder.tokenizer.encode_examples([as_text(x) for x in inputs], self.encoder.spec.max_length)
            per_token = {t.name for t in tasks if t.token_level}
            fn = functools.partial(self._probs, self.params, names=tuple(t.name for t in tasks))
            res = self.encoder.map_units(fn, encoded.ids, batch_size, progress, per_token=per_token) if inputs else {}
            for t in tasks:
                if t.name not in res:
                    out[t.name] = np.zeros((0, t.outputs), np.float32)
                elif t.token_level:  # each word's first sub-token
                    out[t.name] = [p[starts[starts >= 0]] for p, starts in zip(res[t.name], encoded.word_starts)]
                else:
                    out[t.name] = res[t.name]
        return out

    def predict(self, inputs, batch_size: int = 64, progress: bool | None = None) -> list[dict]:
        """Per input, the output of each task that takes it (:meth:`~mtl_jax.tasks.Task.output`;
        classification: a ``Prediction`` with the label and the class probabilities)."""
        inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        probs = self.predict_proba(inputs, batch_size=batch_size, progress=progress)
        tasks = [t for t in self.task_objects if t.name in probs]
        return [{t.name: t.output(probs[t.name][i]) for t in tasks} for i in range(len(inputs))]


def load(path: str | Path, dtype: str = "float32") -> Predictor:
    """Load an exported model directory (``<run>/export``); ``dtype`` as in :func:`load_encoder`."""
    return Predictor(Path(path), dtype)
