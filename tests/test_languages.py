"""Caption languages: sources read them, the cache keeps them, and `data.language_share` samples by
them with the stated rule; without a share, batches are exactly the uniform ones."""

import json
from collections import Counter

import numpy as np
import pytest

from littune.train.batches import CacheBatches
from littune.cache import EmbeddingCache, embed_source, write_cache
from littune.config import load_config
from littune.data import open_source
from littune.errors import ConfigError, LittuneError
from littune.train.sampling import check_share, language_probabilities, pick_caption
from littune.towers.image import build_image_tower
from littune.towers.tiny import SPEC

from data_fixtures import write_images

LANGS = ["en"] * 4 + [lang for lang in ("de", "ja", "ru", "th", "bn") for _ in range(2)]


def _csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "lang"])
        w.writerows(rows)
    return path


def test_a_csv_lang_column_reaches_the_cache(tmp_path):
    names = write_images(tmp_path, 3)
    src = _csv(tmp_path / "pairs.csv", [(names[0], "a red apple", "en"), (names[0], "ein roter Apfel", "de"),
                                        (names[0], "赤いリンゴ", "ja"), (names[1], "a cat", "en"),
                                        (names[1], "кошка", ""), (names[2], "a dog", "en")])
    recs = {r.key: r for r in open_source(src)}
    assert recs[names[0]].langs == ["en", "de", "ja"] and recs[names[1]].langs == ["en", ""]
    cache = embed_source(src, build_image_tower(SPEC), tmp_path / "cache", batch_size=2, progress=False)
    assert cache.languages == ["", "de", "en", "ja"]
    order = [cache.key(i) for i in range(len(cache))]
    assert cache.caption_languages(order.index(names[0])) == ["en", "de", "ja"]
    assert EmbeddingCache.open(tmp_path / "cache").caption_languages(order.index(names[1])) == ["en", ""]


def test_a_lang_column_changes_the_source_fingerprint_and_no_column_keeps_none(tmp_path):
    names = write_images(tmp_path, 1)
    a = _csv(tmp_path / "a.csv", [(names[0], "x", "en")])
    b = _csv(tmp_path / "b.csv", [(names[0], "x", "de")])
    assert open_source(a).fingerprint() != open_source(b).fingerprint()
    (tmp_path / "c.csv").write_text(f"image,caption\n{names[0]},x\n", encoding="utf-8")
    assert open_source(tmp_path / "c.csv").records()[0].langs == []


def test_jsonl_takes_one_language_per_row_or_a_list_per_caption(tmp_path):
    names = write_images(tmp_path, 2)
    lines = [{"image": names[0], "caption": ["a cat", "eine Katze"], "lang": ["en", "de"]},
             {"image": names[1], "caption": "猫", "lang": "ja"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    recs = open_source(tmp_path / "p.jsonl").records()
    assert [r.langs for r in recs] == [["en", "de"], ["ja"]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": names[0], "caption": ["a", "b"], "lang": ["en"]}) + "\n")
    with pytest.raises(LittuneError, match="as long as the caption list"):
        open_source(tmp_path / "bad.jsonl").records()


def test_rows_in_another_encoding_are_skipped_and_reported_the_rest_kept(tmp_path):
    names = write_images(tmp_path, 3)
    good = f"image,caption,lang\n{names[0]},une pomme,fr\n".encode("utf-8")
    latin = f"{names[1]},crème brûlée,fr\n".encode("latin-1")
    tail = f"{names[2]},日本,ja\n".encode("utf-8")
    (tmp_path / "mixed.csv").write_bytes(good + latin + tail)
    src = open_source(tmp_path / "mixed.csv")
    assert [r.key for r in src.records()] == [names[0], names[2]]
    assert len(src.problems) == 1 and src.problems[0][0].endswith("mixed.csv:3") and "mixed encodings" in src.problems[0][1]
    (tmp_path / "all.csv").write_bytes(b"image,caption\n" + latin)
    with pytest.raises(LittuneError, match="not utf-8 text .no row decodes.; set encoding"):
        open_source(tmp_path / "all.csv").records()
    assert open_source(tmp_path / "all.csv", encoding="latin-1").records()[0].captions == ["crème brûlée"]


def test_the_rule_gives_each_named_language_its_share_and_splits_the_rest():
    p = language_probabilities(LANGS, {"en": 0.5})
    assert p["en"] == 0.5 and all(abs(p[x] - 0.1) < 1e-12 for x in ("de", "ja", "ru", "th", "bn"))
    assert language_probabilities(["en", "en"], {"en": 0.3}) == {"en": 1.0}
    assert language_probabilities(["en", "de"], {"en": 0.2, "de": 0.2}) == {"en": 0.5, "de": 0.5}
    rng = np.random.default_rng(0)
    picks = [pick_caption(LANGS, int(r), {"en": 0.5}) for r in rng.integers(1 << 62, size=40000)]
    langs = Counter(LANGS[k] for k in picks)
    assert abs(langs["en"] / 40000 - 0.5) < 0.01
    assert all(abs(langs[x] / 40000 - 0.1) < 0.01 for x in ("de", "ja", "ru", "th", "bn"))
    within = Counter(k for k in picks if LANGS[k] == "en")  # uniform within a language
    assert len(within) == 4 and max(within.values()) / min(within.values()) < 1.1


def test_no_share_is_the_uniform_draw_and_bad_shares_are_one_line():
    for r in (0, 5, 123456789, (1 << 62) - 1):
        assert pick_caption(LANGS, r, {}) == r % len(LANGS)
    for bad in ({"en": 1.5}, {"en": 0.7, "de": 0.6}, {"en": "half"}, ["en"]):
        with pytest.raises(ConfigError, match="language_share"):
            check_share(bad)
    with pytest.raises(ConfigError, match="language_share"):
        load_config(overrides=["data.cache=x", 'data.language_share={"en": 2}'])


def _cache(tmp_path, langs):
    rng = np.random.default_rng(1)
    caps = [[f"img{i} cap{k}" for k in range(len(LANGS))] for i in range(64)]
    return write_cache(tmp_path, rng.standard_normal((64, 32)).astype(np.float32), caps, SPEC,
                       langs=[LANGS] * 64 if langs else None)


def test_batches_without_a_share_equal_those_of_a_cache_without_languages(tmp_path):
    with_langs, without = _cache(tmp_path / "a", True), _cache(tmp_path / "b", False)
    a, b = CacheBatches(with_langs, 16, 0, 1, 3), CacheBatches(without, 16, 0, 1, 3, language_share={"en": 0.5})
    for s in range(6):
        assert a(s)["captions"] == b(s)["captions"]  # a share on a cache with no languages changes nothing
    shared = CacheBatches(with_langs, 16, 0, 1, 3, language_share={"en": 0.5})
    caps = [c for s in range(200) for c in shared(s)["captions"]]
    english = sum(int(c.split("cap")[1]) < 4 for c in caps) / len(caps)
    assert abs(english - 0.5) < 0.03


SCRIPTS = ["a red apple", "ein roter Apfel", "赤いリンゴ", "红苹果", "紅蘋果", "빨간 사과", "красное яблоко",
           "червоне яблуко", "แอปเปิลแดง", "लाल सेब", "লাল আপেল", "táo đỏ", "czerwone jabłko", "punainen omena"]


def test_the_bpe_tokenizer_covers_every_script_it_was_trained_on():
    from littune.towers.text import train_tokenizer

    tok = train_tokenizer(SCRIPTS * 3, vocab_size=400)
    assert tok.unk_token_id is None or all(tok.unk_token_id not in tok(t)["input_ids"] for t in SCRIPTS)
    for text in SCRIPTS + ["ไม่เคยเห็น", "未見の文字"]:  # also text it never saw: bytes, never <unk>
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).strip() == text.lower()


def test_a_language_without_captions_is_reported_not_scored(tmp_path):
    from littune.eval.languages import _retrieval, language_table

    (tmp_path / "retrieval.xx.csv").write_text("image,caption\n", encoding="utf-8")
    assert _retrieval(None, None, [], tmp_path / "retrieval.xx.csv") is None  # no caption: nothing to score
    assert _retrieval(None, None, [], tmp_path / "missing.csv") is None
    row = {"lang": "xx", "heldout_designs_acc1": 0.5, "heldout_concepts_acc1": 0.25, "heldout_concepts_t2i_r1": None,
           "heldout_designs_chance": 0.1, "heldout_concepts_chance": 0.2, "heldout_concepts_t2i_chance": 0.2}
    assert "| xx | 0.500 | 0.250 | n/a | 0 |" in language_table([row])


def test_a_source_without_languages_keeps_the_fingerprint_it_had_before_lang_column_existed(tmp_path):
    """The fingerprint of a plain image,caption CSV is computed exactly as before languages existed, so
    caches built then stay valid (the rule of littune.data.base, written out here by hand)."""
    import hashlib

    from littune.data.base import file_digest, file_stamp

    names = write_images(tmp_path, 2)
    (tmp_path / "p.csv").write_text(f"image,caption\n{names[0]},a cat\n{names[1]},a dog\n", encoding="utf-8")
    src = open_source(tmp_path / "p.csv")
    h = hashlib.sha256()
    h.update(b"littune-source-v2|csv|")
    h.update(json.dumps({"image_column": None, "caption_column": None, "caption_sep": None, "delimiter": None},
                        sort_keys=True).encode())
    h.update(file_digest(str(tmp_path / "p.csv")))
    for r in src.records():
        h.update(json.dumps([r.key, r.captions, r.size, file_stamp(r.path)], ensure_ascii=False).encode())
    assert src.fingerprint() == f"csv-{h.hexdigest()[:16]}"
