"""A pre-trained text tower's ``prefix`` (e5's "query: "): every caption, prompt and query gets it, the
saved model keeps it, and tokenizer.json (ONNX export), open_clip's tokenizer and the fingerprint carry it.

Two tiny BERT folders (tests/tiny_bert.py): a WordPiece ``BertTokenizer``, whose normaliser transformers
rebuilds on every load (the prefix must come back from the spec), and a Unigram tokenizer saved as
``PreTrainedTokenizerFast``, whose tokenizer.json is kept as is on load (the prefix must not double)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_bert import hf_model, tiny_bert

import littune
from littune import LiTModel

PREFIX = "query: "
TEXTS = ["a red apple", "ein roter Apfel", "un chat noir", "猫が好きです", "قطة سوداء", "Кошка на ковре",
         "🍎 apple emoji", "a cat on a mat, a black dog " * 6]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["wordpiece", "unigram"])
def folder(request, tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp(request.param) / "bert", request.param)


def _plain_ids(folder, texts, length):
    """The folder's own tokenizer on ``prefix + text``, cut at ``length``: what the prefix must give."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tok([PREFIX + t for t in texts], truncation=True, max_length=length)["input_ids"]


def _ids(model, texts):
    return [row[m.bool()].tolist() for row, m in zip(*model.tokenize(texts).values())]


def test_the_prefix_is_put_before_every_text_and_truncation_counts_its_tokens(folder):
    model = hf_model(folder, context_length=16)
    assert _ids(model, TEXTS) == _plain_ids(folder, TEXTS, 16)
    assert len(_ids(model, TEXTS[-1:])[0]) == 16  # the long caption: cut with the prefix's tokens counted
    plain = hf_model(folder, prefix=None)
    assert _ids(plain, TEXTS[:1]) != _ids(model, TEXTS[:1])
    assert plain.text_tower.prefix is None and "prefix" not in plain.text_tower.save(folder.parent / "plain")


def test_a_prefixed_model_saved_and_loaded_gives_the_same_ids_and_embeddings(folder, tmp_path):
    from tokenizers import normalizers

    model = hf_model(folder).eval()
    path = model.save_pretrained(tmp_path / "m")
    assert json.loads((path / "config.json").read_text())["config"]["text_tower"]["prefix"] == PREFIX
    loaded = LiTModel.from_pretrained(path)
    assert loaded.text_tower.prefix == PREFIX
    assert _ids(loaded, TEXTS) == _ids(model, TEXTS) == _plain_ids(folder, TEXTS, 16)
    assert torch.equal(loaded.encode_texts(TEXTS), model.encode_texts(TEXTS))
    norm = loaded.text_tower.tokenizer.backend_tokenizer.normalizer
    prepends = [norm[i] for i in range(len(norm)) if isinstance(norm[i], normalizers.Prepend)]
    assert len(prepends) == 1  # loading never doubles it, whether transformers kept tokenizer.json or not
    again = LiTModel.from_pretrained(loaded.save_pretrained(tmp_path / "again"))
    assert _ids(again, TEXTS) == _ids(model, TEXTS)


def test_open_clip_tokenizer_gives_the_prefixed_ids(folder, tmp_path):
    model = hf_model(folder).eval()
    path = model.save_pretrained(tmp_path / "m")
    tok = littune.get_tokenizer(path)
    ids = tok(TEXTS)
    assert torch.equal(ids, model.tokenize(TEXTS)["input_ids"])
    assert [row[row != tok.pad_token_id].tolist() for row in ids] == _plain_ids(folder, TEXTS, 16)
    clip, _ = littune.create_model_from_pretrained(path)
    with torch.no_grad():
        got = clip.encode_text(tok(TEXTS), normalize=True)
    assert torch.allclose(got, model.encode_texts(TEXTS), atol=1e-6, rtol=0)


def test_onnx_export_tokenizer_json_gives_littunes_prefixed_ids_and_the_fingerprint_covers_the_prefix(folder, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from littune.export.onnx import export_onnx_model

    model = hf_model(folder).eval()
    record = export_onnx_model(model, tmp_path / "onnx")
    assert record["text_prefix"] == PREFIX
    enc = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json")).encode_batch(TEXTS)
    want = model.tokenize(TEXTS, padding="longest")
    assert [e.ids for e in enc] == want["input_ids"].tolist()
    assert [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in enc] == _plain_ids(folder, TEXTS, 16)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}
    got = session.run(None, feed)[0]
    assert np.abs(got - model.encode_texts(TEXTS).numpy()).max() <= 1e-4
    other = hf_model(folder, prefix="passage: ").eval()
    other.load_state_dict(model.state_dict())  # the same weights, another prefix
    second = export_onnx_model(other, tmp_path / "onnx2")
    assert second["text_prefix"] == "passage: "
    assert second["fingerprints"]["text_embeddings"] != record["fingerprints"]["text_embeddings"]


def test_a_prefix_that_is_not_a_string_is_a_one_line_config_error(folder):
    from littune.config import load_config
    from littune.errors import ConfigError

    base = ["data.cache=x", "model.setting=LU"]
    with pytest.raises(ConfigError, match="model.text_tower.prefix: expected a string"):
        load_config(overrides=base + [f"model.text_tower={{type: hf, path: {folder}, prefix: 3}}"])
    with pytest.raises(ConfigError, match="unknown configuration key 'model.text_tower.prefix'"):  # hf only
        load_config(overrides=base + ["model.text_tower={type: transformer, prefix: 'query: '}"])
    cfg = load_config(overrides=base + [f"model.text_tower={{type: hf, path: {folder}, prefix: 'query: '}}"])
    assert cfg.model.text_tower["prefix"] == PREFIX
