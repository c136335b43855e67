"""Loading pretrained encoders: parity with sentence-transformers, exact BERT conversion, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mtl_jax import MtlError, load_encoder
from mtl_jax.data.assets import embedded_model_dir
from mtl_jax.model.pretrained import flax_to_torch_state
from tests.helpers import torch_vectors, write_tiny_bert

SENTENCES = [
    "A three-hour cinema master class.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenization handles UNICODE: café, naïve, 日本語 and emoji 🙂.",
    "",
    " ".join(["word"] * 300),  # past the 256-token limit
]


def test_embedded_model_matches_sentence_transformers(minilm):
    """The embedded BERT checkpoint, converted to DistilBERT, gives the vectors sentence-transformers
    (and plain AutoModel) compute from the same files in PyTorch."""
    torch_side = torch_vectors(embedded_model_dir(), SENTENCES)
    got = minilm.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    for side in ("st", "auto"):
        np.testing.assert_allclose(got, torch_side[side], atol=1e-5, rtol=0, err_msg=side)
    # checkpoint settings: mean pooling, normalized, 256 tokens
    assert (minilm.spec.pooling, minilm.spec.normalize, minilm.spec.max_length) == ("mean", True, 256)


def test_short_name_is_the_embedded_model(minilm):
    other = load_encoder("all-MiniLM-L6-v2")
    np.testing.assert_array_equal(other.encode(["same weights"]), minilm.encode(["same weights"]))


def test_long_input_is_truncated_to_max_length(minilm):
    long = "word " * 600
    ids, truncated = minilm.tokenizer([long], 256)
    assert len(ids[0]) == 256 and truncated[0]
    # truncation keeps the first 254 word pieces: extra words after them change nothing
    a, b = minilm.encode([long, long + " completely different ending"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bert_conversion_is_exact(tmp_path):
    """The converted encoder's token states equal FlaxBertModel's on the same weights, over packed rows:
    single sentences (token type 0) and cross-encoded pairs, whose second text gets BERT's token type 1."""
    from transformers import BertConfig, FlaxBertModel

    from mtl_jax.data.packing import packed_calls
    from mtl_jax.data.text import Joined
    from mtl_jax.model.encoder import Encoder

    config, bert_params = write_tiny_bert(tmp_path / "bert", seed=3)  # (random token-type rows: both count)
    enc = load_encoder(tmp_path / "bert")
    assert enc.config.n_layers == 2 and enc.config.dim == 32
    bert = FlaxBertModel(BertConfig(**config))
    sentences = [
        "a cat sat on the mat",
        "hello",
        "the quick brown fox jumps over the lazy dog",
        "naïve café",
        "yes",
        "ok",
    ]
    pairs = list(zip(sentences, reversed(sentences)))
    for texts, examples in ((sentences, sentences), (pairs, [Joined(p) for p in pairs])):
        hf = enc.hf_tokenizer(*zip(*texts) if texts is pairs else (texts,), padding=True, return_tensors="np")
        assert hf["token_type_ids"].any() == (texts is pairs)
        want = np.asarray(bert(**hf, params=bert_params).last_hidden_state)
        units = enc.tokenizer.encode_examples(examples, 64).ids
        shared = 0  # rows that hold more than one example
        for call in packed_calls(units, 64, enc.tokenizer.pad_id):
            states = np.asarray(
                Encoder(enc.config).apply({"params": enc.params}, call.ids, call.positions, call.segments)
            )
            shared += int((call.segments.max(axis=1) > 1).sum())
            for slot in np.flatnonzero(call.first):
                row, at = call.tokens_of(slot)
                i = call.index[slot]
                n = len(units[i])
                np.testing.assert_allclose(states[row, at : at + n], want[i, :n], atol=1e-5, rtol=0)
        assert shared > 0


def test_distilbert_safetensors_and_msgpack_load_the_same(tmp_path, tiny_bert):
    from flax import traverse_util
    from flax.serialization import to_bytes

    enc = load_encoder(tiny_bert)
    dist = tmp_path / "distil"
    dist.mkdir()
    state = flax_to_torch_state(enc.params)
    save_file({f"distilbert.{k}": v for k, v in state.items()}, str(dist / "model.safetensors"))
    cfg = enc.config.to_dict()
    (dist / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(tiny_bert / f, dist / f)
    a = load_encoder(dist).encode(["hello there", "x"])
    np.testing.assert_allclose(a, enc.encode(["hello there", "x"]), atol=1e-6)
    (dist / "model.safetensors").unlink()
    (dist / "flax_model.msgpack").write_bytes(to_bytes(enc.params))
    b = load_encoder(dist).encode(["hello there", "x"])
    np.testing.assert_allclose(b, a, atol=1e-6)
    assert traverse_util.flatten_dict(enc.params).keys() == traverse_util.flatten_dict(load_encoder(dist).params).keys()


def test_sentence_transformers_layout_sets_pooling(tmp_path, tiny_bert):
    d = tmp_path / "st"
    shutil.copytree(tiny_bert, d)
    (d / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    enc = load_encoder(d)
    assert (enc.spec.pooling, enc.spec.normalize, enc.spec.max_length) == ("cls", False, 64)


# ---------------------------------------------------------------------------- refusals


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pickle_is_refused_without_opt_in(tmp_path, tiny_bert):
    d = _copy(tiny_bert, tmp_path / "pkl")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(MtlError, match=r"pytorch_model\.bin: pickle checkpoints can run arbitrary code"):
        load_encoder(d)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "roberta"}, r"config\.json: model_type 'roberta' is unsupported"),
        (
            {"position_embedding_type": "relative_key"},
            r"config\.json: unsupported BERT variant: position_embedding_type",
        ),
        ({"hidden_act": "relu"}, r"config\.json: unsupported BERT variant: hidden_act 'relu'"),
        ({"hidden_size": 48, "num_attention_heads": 4}, r"model\.safetensors: weight .* has shape"),
    ],
)
def test_unsupported_or_inconsistent_config_is_refused(tmp_path, tiny_bert, change, message):
    d = _copy(tiny_bert, tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(MtlError, match=message):
        load_encoder(d)


def test_missing_pieces_are_named(tmp_path, tiny_bert):
    with pytest.raises(MtlError, match=r"nowhere: no such directory"):
        load_encoder(tmp_path / "nowhere")
    d = _copy(tiny_bert, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(MtlError, match=r"noweights: no weights found"):
        load_encoder(d)
    d = _copy(tiny_bert, tmp_path / "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(MtlError, match=r"noconfig/config\.json: no config\.json"):
        load_encoder(d)
    d = _copy(tiny_bert, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(MtlError, match=r"corrupt/model\.safetensors: not a readable safetensors file"):
        load_encoder(d)
    d = _copy(tiny_bert, tmp_path / "missing_tensor")
    state = load_file(str(d / "model.safetensors"))
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(MtlError, match=r"missing weights transformer\.layer\.1\.ffn\.lin2\.kernel"):
        load_encoder(d)


def test_unknown_hub_name_says_no_hub(monkeypatch):
    """Offline in fact: huggingface_hub read HF_HUB_OFFLINE when it was imported, so its constant is
    set too, and any connection attempt is recorded (the loader turns every failure into its message,
    so only the record shows whether the network was tried)."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def connect(sock, address, *a):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: connect(None, (host, port)))
    with pytest.raises(MtlError, match=r"not available from the Hugging Face cache or hub.*local directory"):
        load_encoder("some-org/some-model-that-is-not-cached")
    assert attempts == []


def test_encode_keeps_order_and_bounds_compiled_shapes(minilm):
    from mtl_jax.data.packing import row_lengths

    rng = np.random.default_rng(0)
    words = ["film", "plot", "great", "dull", "actor", "scene", "a", "the"]
    texts = [" ".join(rng.choice(words, rng.integers(0, 120))) for _ in range(300)]
    compiled_before = minilm._embed_fn._cache_size()  # the fixture is shared with other tests
    out = minilm.encode(texts, batch_size=32, max_length=128)
    # one shape per row length for the 300 sentences
    assert minilm._embed_fn._cache_size() - compiled_before <= len(row_lengths(128))
    # rows in input order: each equals the sentence encoded alone (one row of its length: one shape more)
    for i in (0, 57, 299):
        compiled_before = minilm._embed_fn._cache_size()
        np.testing.assert_allclose(out[i], minilm.encode([texts[i]], max_length=128)[0], atol=1e-5)
        assert minilm._embed_fn._cache_size() - compiled_before <= 1


@pytest.mark.parametrize("mode", ["cls", "mean", "max"])
def test_pooling_modes_match_numpy(minilm, mode):
    from mtl_jax.model.encoder import Encoder

    text = "pooling is checked against numpy"
    ids, _ = minilm.tokenizer([text], 256)
    row = ids[0][None]
    hidden = np.asarray(
        Encoder(minilm.config).apply({"params": minilm.params}, row, np.arange(row.shape[1])[None], np.ones_like(row))[
            0
        ]
    )
    want = {"cls": hidden[0], "mean": hidden.mean(0), "max": hidden.max(0)}[mode]
    got = minilm.encode([text], pooling=mode, normalize=False)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    normed = minilm.encode([text], pooling=mode, normalize=True)[0]
    np.testing.assert_allclose(np.linalg.norm(normed), 1.0, atol=1e-6)


def test_bfloat16_encoder_computes_in_bf16_and_keeps_the_vectors(minilm):
    """``dtype="bfloat16"`` runs the products in bfloat16 and gives float32 vectors that rank 300 real
    snippets' similarities as float32 does; an unknown dtype is refused by name."""
    import dataclasses

    import jax
    from scipy.stats import spearmanr

    from benchmarks.encode import rotten_tomatoes_texts
    from tests.helpers import dot_products

    texts = rotten_tomatoes_texts()[:300]
    bf16 = dataclasses.replace(minilm, dtype="bfloat16")
    x, y = minilm.encode(texts), bf16.encode(texts)
    assert y.dtype == np.float32 and (x * y).sum(1).min() > 0.999
    upper = np.triu_indices(len(texts), 1)
    assert spearmanr((x @ x.T)[upper], (y @ y.T)[upper]).statistic > 0.999
    ids = np.ones((2, 16), np.int32)
    for enc, want in ((minilm, False), (bf16, True)):
        jaxpr = jax.make_jaxpr(lambda p, i: enc._embed_fn(p, i, i, i, pooling="mean", normalize=True))(enc.params, ids)
        assert any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dot_products(jaxpr.jaxpr)) == want
    with pytest.raises(MtlError, match=r"dtype 'float16' is not one of float32, bfloat16"):
        load_encoder(dtype="float16")


def test_non_string_item_is_named(minilm):
    with pytest.raises(MtlError, match=r"sentences\[1\] is int, not str"):
        minilm.encode(["fine", 3])
