"""A locked text tower's caption features, computed once (littune.cache.text), and the caption budget
(littune.cache.budget): LL trains from two caches and never runs the text tower per step."""

import json

import numpy as np
import pytest
import torch

from littune.config import load_config
from littune.errors import ConfigError, LittuneError, StaleCacheError

from test_trainer import TINY, _losses, make_source


def make_bert(folder, captions, seed=0):
    """A small BERT folder (WordPiece trained on ``captions``, random weights): a pre-trained ``hf`` tower."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=fast.vocab_size, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _ll(tmp_path, *extra):
    src = make_source(tmp_path / "data")
    captions = [ln.split(",", 1)[1] for ln in src.read_text().splitlines()[1:]]
    bert = make_bert(tmp_path / "bert", captions)
    text = f"model.text_tower={{type: hf, path: '{bert}', context_length: 16}}"
    return load_config(overrides=TINY + [text, "model.setting=LL", f"run_dir={tmp_path / 'run'}",
                                         f"data.source={src}", f"data.cache={tmp_path / 'cache'}", *extra]), captions


def test_ll_trains_the_heads_from_two_caches_and_never_runs_the_text_tower_per_step(tmp_path, monkeypatch):
    from littune.towers.text import HFTextTower
    from littune.train.trainer import Trainer

    cfg, captions = _ll(tmp_path, "steps=60", "optim.lr=1e-2", f"data.text_cache={tmp_path / 'texts'}")
    calls = []
    forward = HFTextTower.forward
    monkeypatch.setattr(HFTextTower, "forward", lambda self, *a, **k: calls.append(len(a[0])) or forward(self, *a, **k))
    Trainer(cfg).run()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 60 and np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3
    # the tower ran over each distinct caption once, in the fill before step 1: never per step
    assert sum(calls) == len(set(captions))
    store = json.loads((tmp_path / "texts" / "manifest.json").read_text())
    assert store["dim"] == 24 and store["tower"].startswith("hf|")


def test_the_text_cache_gives_the_towers_own_embeddings_and_stores_new_texts(tmp_path):
    from littune import LiTModel

    cfg, captions = _ll(tmp_path)
    torch.manual_seed(0)
    model = LiTModel.from_config(cfg.model).eval()
    texts = captions[:6] + ["a purple stripe in the dark", "green"]
    plain = model.encode_texts(texts)
    store = model.use_text_cache(tmp_path / "texts")
    assert len(store) == 0
    cached = model.encode_texts(texts)
    assert torch.allclose(cached, plain, atol=1e-5) and len(store) == len(set(texts))
    torch.manual_seed(0)
    again = LiTModel.from_config(cfg.model).eval()  # the same weights: the same fingerprint, cached texts read
    again.use_text_cache(tmp_path / "texts")
    assert torch.allclose(again.encode_texts(texts), plain, atol=1e-5)


def test_a_text_cache_of_another_tower_is_refused(tmp_path):
    from littune import LiTModel

    cfg, captions = _ll(tmp_path)
    model = LiTModel.from_config(cfg.model).eval()
    model.use_text_cache(tmp_path / "texts")
    model.encode_texts(captions[:4])
    other = make_bert(tmp_path / "bert2", captions, seed=1)
    cfg2 = load_config(overrides=TINY + [f"model.text_tower={{type: hf, path: '{other}', context_length: 16}}",
                                         "model.setting=LL", f"data.source={tmp_path}"])
    with pytest.raises(StaleCacheError, match="holds the features of text tower"):
        LiTModel.from_config(cfg2.model).use_text_cache(tmp_path / "texts")
    unlocked = LiTModel.from_config(cfg.model.__class__(**{**cfg.model.__dict__, "setting": "LU"}))
    with pytest.raises(ValueError, match="needs a locked text tower"):
        unlocked.use_text_cache(tmp_path / "texts")


def test_a_fill_killed_midway_keeps_its_complete_shards_and_finishes_to_the_same_features(tmp_path):
    from littune.cache.text import TextFeatureCache

    texts = [f"text number {i}" for i in range(50)]

    def encode(chunk):
        return np.stack([np.full(4, float(t.split()[-1])) for t in chunk]).astype(np.float32)

    def dies_on_third(chunk, seen=[]):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return encode(chunk)

    store = TextFeatureCache.open(tmp_path / "t", "tower-a", 4)
    with pytest.raises(KeyboardInterrupt):
        store.fill(texts, dies_on_third, shard_texts=10)
    # a half-written shard of a killed run (features without a commit record) is never read
    (tmp_path / "t" / "shards" / "00002.npy").write_bytes(b"garbage")
    reopened = TextFeatureCache.open(tmp_path / "t", "tower-a", 4)
    assert len(reopened) == 20
    computed = []
    assert reopened.fill(texts, lambda c: computed.append(len(c)) or encode(c), shard_texts=10) == 30
    assert sum(computed) == 30
    assert np.array_equal(reopened.features(texts), encode(texts))
    with pytest.raises(LittuneError, match="has no features for 'unknown'"):
        reopened.features(["unknown"])


def _lang_source(tmp_path):
    src = make_source(tmp_path / "data")
    lines = src.read_text().splitlines()
    rows = ["image,caption,lang"]
    for ln in lines[1:]:
        image, caption = ln.split(",", 1)
        rows += [f"{image},{caption},en", f"{image},{caption} (de),de", f"{image},{caption} (fr),fr",
                 f"{image},{caption} (ja),ja"]
    out = tmp_path / "data" / "langs.csv"
    out.write_text("\n".join(rows) + "\n")
    return out


def test_a_caption_budget_keeps_at_most_its_counts_per_image_the_same_each_time(tmp_path):
    from littune.train.batches import CacheBatches
    from littune.cache import EmbeddingCache, embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    src = _lang_source(tmp_path)
    tower = build_image_tower({"type": "torch", "factory": "littune.towers.tiny:tiny_cnn",
                               "preprocess": {"size": 32, "resize": 32}}).eval()
    embed_source(open_source(str(src)), tower, tmp_path / "cache", progress=False)
    cache = EmbeddingCache.open(tmp_path / "cache")
    budget = {"en": 1, "*": 1}
    data = CacheBatches(cache, 16, 0, 1, seed=3, budget=budget)
    kept = {}
    for i in range(len(cache)):
        texts, langs = data.cache.kept(i)
        assert langs.count("en") == 1 and len(langs) == 2  # 2 English of 2, 1 other of 6
        kept[i] = set(texts)
    drawn = [c for s in range(20) for c in data(s)["captions"]]
    allowed = set().union(*kept.values())
    assert set(drawn) <= allowed and set(data.texts()) == allowed
    assert len({c for c in drawn if c.endswith(")")}) > 10  # the other languages are drawn too
    again = CacheBatches(cache, 16, 0, 1, seed=3, budget=budget)
    assert [again.cache.kept(i)[0] for i in range(len(cache))] == [sorted(kept[i], key=cache.captions(i).index)
                                                                 for i in range(len(cache))]
    assert data(7)["captions"] == again(7)["captions"]


@pytest.mark.parametrize("budget, match", [("{en: -1}", "whole number >= 0"), ("{en: 0}", "keeps no caption"),
                                           ("[1, 2]", "caption_budget: expected a mapping")])
def test_a_bad_caption_budget_is_one_line_naming_the_key(tmp_path, budget, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=TINY + [f"data.caption_budget={budget}", f"data.cache={tmp_path}"])


def test_a_small_cache_read_into_memory_gives_the_same_batches_as_reading_each_step(tmp_path, monkeypatch):
    from littune.train import batches
    from littune.train.batches import CacheBatches
    from littune.cache import EmbeddingCache, embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    src = _lang_source(tmp_path)
    tower = build_image_tower({"type": "torch", "factory": "littune.towers.tiny:tiny_cnn",
                               "preprocess": {"size": 32, "resize": 32}}).eval()
    embed_source(open_source(str(src)), tower, tmp_path / "cache", progress=False)
    cache = EmbeddingCache.open(tmp_path / "cache")
    resident = CacheBatches(cache, 16, 0, 1, seed=1, language_share={"en": 0.5})
    monkeypatch.setattr(batches, "RESIDENT_BYTES", 0)
    streamed = CacheBatches(cache, 16, 0, 1, seed=1, language_share={"en": 0.5})
    assert resident._resident is not None and streamed._resident is None
    for step in (0, 3, 11):
        a, b = resident(step), streamed(step)
        assert torch.equal(a["image_features"], b["image_features"]) and a["captions"] == b["captions"]


def test_mlp_heads_save_load_and_export_to_the_same_embeddings(tiny_model, tmp_path):
    from littune import LiTModel
    from littune.export.onnx import export_text

    model = tiny_model("Lu", image_head="mlp", text_head="mlp").eval()
    assert isinstance(model.text_head, torch.nn.Sequential) and model.text_head[0].out_features == 4 * 16
    texts = ["a red apple", "ein roter Apfel", "猫が好きです"]
    loaded = LiTModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert torch.allclose(loaded.encode_texts(texts), model.encode_texts(texts), atol=1e-6)
    err, _ = export_text(model, tmp_path / "text.onnx")
    assert err <= 1e-4  # the ONNX graph holds the MLP too


def test_a_text_cache_holds_no_features_in_memory_filling_or_reading(tmp_path):
    """20k texts of 256-d features (20 MB on disk): filled from a generator and read back, the Python
    allocations stay under 4 MB (the index: 16 bytes a text; one shard of features while it is written)."""
    import tracemalloc

    from littune.cache.text import TextFeatureCache

    n, dim = 20000, 256

    def texts():
        for i in range(n):
            yield f"caption {i}"
            yield f"caption {i // 2}"  # repeats: computed once

    def encode(chunk):
        return np.stack([np.full(dim, float(t.split()[-1]), np.float32) for t in chunk])

    tracemalloc.start()
    try:
        store = TextFeatureCache.open(tmp_path / "t", "tower-a", dim)
        assert store.fill(texts(), encode, shard_texts=1024) == n
        fill_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        reopened = TextFeatureCache.open(tmp_path / "t", "tower-a", dim)
        batch = [f"caption {i}" for i in np.random.default_rng(0).integers(0, n, 256)]
        feats = reopened.features(batch)
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(reopened) == n and np.array_equal(feats, encode(batch))
    assert fill_peak < 4 << 20 and read_peak < 4 << 20, (fill_peak, read_peak)
