"""`littune export --format web`: a static search page, served by a plain file server, searched in Chromium.

A tiny model and an index of eight small images are exported; the folder is served with Python's
`http.server` on a free loopback port and driven in headless Debian chromium (the flags of
test_serve_browser). The page tokenizes with tokenizers.js and runs text.onnx in onnxruntime-web:
its token ids must equal littune's (several scripts, one text past the context length), and a typed
query's first image must be `littune search`'s first, with the same scores. onnxruntime-web and
@huggingface/tokenizers come from npm, fetched once into a folder kept across test sessions
($LITTUNE_TEST_NPM, else <tmp>/littune-test-npm); without npm and without that folder, the browser
tests skip with the reason.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from chromium import headless_chromium
from conftest import CAPTIONS
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from littune.cli import main  # noqa: E402
from littune.errors import LittuneError  # noqa: E402

TEXTS = ["a red apple", "ein roter Apfel", "猫が好きです", "قطة سوداء", "Кошка на ковре", "🍎 apple emoji",
         "a caption far longer than the context length allows " * 4]

pytestmark = pytest.mark.usefixtures("one_thread")


def _collection(root: Path, n: int = 8) -> Path:
    """Eight coloured squares of different sizes, one of them not square, in two sub-folders."""
    rng = np.random.default_rng(5)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        arr = np.full((48, 40 + 30 * (i == 3), 3), 230, np.uint8)
        arr[4 + i:30, 6:34] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(sub / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, index, model dir, index dir): a tiny Lu model and an index of :func:`_collection`."""
    import torch
    from conftest import TINY_TEXT

    from littune import LiTConfig, LiTModel
    from littune.search import build_index
    from littune.towers.tiny import SPEC

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("web")
    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
    LiTModel.from_config(cfg, captions=CAPTIONS).save_pretrained(tmp / "model")
    model = LiTModel.from_pretrained(tmp / "model")
    index = build_index(model, str(_collection(tmp / "photos")), tmp / "idx", model_dir=tmp / "model",
                        progress=False, workers=0)
    return model, index, tmp / "model", tmp / "idx"


@pytest.fixture(scope="module")
def packages():
    """An npm folder holding onnxruntime-web and @huggingface/tokenizers, kept across sessions."""
    from littune.builders.fetch import fetch_npm
    from littune.export.web import ORT_WEB, TOKENIZERS_JS

    root = Path(os.environ.get("LITTUNE_TEST_NPM") or Path(tempfile.gettempdir()) / "littune-test-npm")
    try:
        found = fetch_npm([ORT_WEB, TOKENIZERS_JS], root, log=lambda m: None)
    except LittuneError as e:
        pytest.skip(f"the page's npm packages are not available: {e}")
    return Path(found["onnxruntime-web"]).parent


@pytest.fixture(scope="module")
def exported(built, packages, tmp_path_factory):
    model, index, model_dir, index_dir = built
    out = tmp_path_factory.mktemp("export") / "web"
    rc = main(["export", str(model_dir), "--format", "web", "--index", str(index_dir), "--out", str(out),
               "--packages", str(packages)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def served(exported):
    """The exported folder on a plain static file server (http.server) on a free loopback port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(exported)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium(script_timeout=20)


def wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") in ("1", "error"))
    if driver.find_element("tag name", "body").get_attribute("data-ready") != "1":
        pytest.fail(f"the page did not start: {driver.find_element('id', 'status').text}")


# -- the folder --------------------------------------------------------------------------------------
def test_web_folder_holds_the_text_graph_the_index_embeddings_thumbnails_and_the_page(built, exported):
    _, index, _, _ = built
    meta = json.loads((exported / "littune_web.json").read_text())
    assert meta["format"] == "littune-web" and meta["count"] == len(index) == 8 and meta["dim"] == 16
    assert meta["keys"] == list(index.keys)
    emb = np.frombuffer((exported / meta["embeddings"]).read_bytes(), dtype="<f2").reshape(8, 16)
    assert np.array_equal(emb, index.embeddings)
    for key, thumb in zip(meta["keys"], meta["thumbnails"]):
        with Image.open(exported / thumb) as im:
            assert im.format == "JPEG" and max(im.size) <= 128
            assert im.size[0] > im.size[1] if "img3" in key else im.size[0] < im.size[1]  # aspect kept
    for name in ("text.onnx", "tokenizer.json", "littune_onnx.json", "index.html", "app.js", "style.css",
                 "vendor/ort.wasm.bundle.min.mjs", "vendor/ort-wasm-simd-threaded.wasm", "vendor/tokenizers.min.mjs"):
        assert (exported / name).is_file(), name
    assert meta["vendor"] == {"onnxruntime-web": "1.30.0", "@huggingface/tokenizers": "0.2.0"}
    assert "where" not in meta and not (exported / "image.onnx").exists()  # no file paths, no image graph


def test_existing_out_and_missing_index_are_one_line_errors_nothing_overwritten(built, exported, tmp_path, capsys):
    _, _, model_dir, index_dir = built
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["export", str(model_dir), "--format", "web", "--index", str(index_dir), "--out", str(taken)]) != 0
    err = capsys.readouterr().err.strip()
    assert "exists; choose another --out or pass --overwrite" in err and len(err.splitlines()) == 1
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    assert main(["export", str(model_dir), "--format", "web", "--index", str(index_dir), "--out", str(taken),
                 "--overwrite"]) != 0  # --overwrite replaces only an earlier web export
    assert "is not a littune web export (no littune_web.json)" in capsys.readouterr().err
    assert (taken / "notes.txt").read_text() == "mine"
    assert main(["export", str(model_dir), "--format", "web", "--out", str(tmp_path / "new")]) != 0
    assert "--format web needs --index INDEX" in capsys.readouterr().err and not (tmp_path / "new").exists()
    import torch

    other, changed = tmp_path / "other-model", copy.deepcopy(built[0])
    with torch.no_grad():
        changed.image_head.weight.add_(0.1)  # another image head: the index holds other embeddings
    changed.save_pretrained(other)
    assert main(["export", str(other), "--format", "web", "--index", str(index_dir), "--out", str(tmp_path / "new")]) != 0
    assert "rebuild the index" in capsys.readouterr().err and not (tmp_path / "new").exists()
    before = (exported / "littune_web.json").read_bytes()
    assert main(["export", str(model_dir), "--format", "web", "--index", str(index_dir), "--out", str(exported)]) != 0
    assert (exported / "littune_web.json").read_bytes() == before


# -- the page in Chromium -----------------------------------------------------------------------------
def test_page_tokenizes_as_littune_in_several_scripts(built, served, browser):
    model = built[0]
    open_page(browser, served)
    for text in TEXTS:
        want = model.text_tower.tokenize([text], padding="do_not_pad")["input_ids"][0].tolist()
        got = browser.execute_script("return window.littune.tokenize(arguments[0])", text)
        assert got == want, text
    assert len(got) == model.text_tower.context_length  # the long text was truncated, specials kept


def _other_tokenizers():
    """(name, tokenizer.json text): littune's Unigram tokenizer, a WordPiece one with e5's prefix in its
    normaliser (littune.towers.text.with_prefix) and the default pre-trained tower's WordPiece."""
    from tiny_bert import tiny_bert

    from littune.towers.text import default_text_model_path, load_hf_tokenizer, train_tokenizer

    out = [("unigram", train_tokenizer(CAPTIONS, vocab_size=300, kind="unigram").backend_tokenizer.to_str())]
    folder = tiny_bert(Path(tempfile.mkdtemp(prefix="littune-test-bert-")), "wordpiece")
    out.append(("prefixed", load_hf_tokenizer(folder, "query: ").backend_tokenizer.to_str()))
    try:
        from transformers import AutoTokenizer

        out.append(("minilm", AutoTokenizer.from_pretrained(default_text_model_path()).backend_tokenizer.to_str()))
    except Exception as e:  # the optional package littune[minilm] is not installed
        print(f"MiniLM tokenizer not checked: {type(e).__name__}: {e}")
    return out


def _prefixed_model(built, folder):
    """A model over a tiny BERT text tower with e5's prefix and the image side of ``built`` (the index's)."""
    from tiny_bert import hf_model, tiny_bert

    model = hf_model(tiny_bert(folder, "wordpiece"), prefix="query: ").eval()
    model.image_head.load_state_dict(built[0].image_head.state_dict())
    return model


NODE_ENCODE = """
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
const [lib, tokenizerJson, texts] = process.argv.slice(2);
const { Tokenizer } = await import(pathToFileURL(lib).href);
const tok = new Tokenizer(JSON.parse(readFileSync(tokenizerJson, "utf8")), {});
console.log(JSON.stringify(JSON.parse(texts).map((t) => tok.encode(t).ids)));
"""


def test_a_prefixed_text_tower_exports_its_prefix_and_tokenizers_js_puts_it_before_every_query(built, packages, tmp_path):
    """The prefix lives in tokenizer.json's normaliser: the records name it, and tokenizers.js (the page's
    own copy, run in node where it is installed) gives the ids of littune's tokenizer in several scripts."""
    import shutil
    import subprocess

    from tokenizers import Tokenizer

    from littune.export.web import export_web_demo

    model, index = _prefixed_model(built, tmp_path / "bert"), built[1]
    out = tmp_path / "web"
    record = export_web_demo(model, index, out, packages=packages, log=lambda m: None)
    assert record["text"]["prefix"] == "query: " == json.loads((out / "littune_onnx.json").read_text())["text_prefix"]
    enc = Tokenizer.from_file(str(out / "tokenizer.json")).encode_batch(TEXTS)
    assert [e.ids for e in enc] == model.tokenize(TEXTS, padding="longest")["input_ids"].tolist()
    want = [model.text_tower.tokenize([t], padding="do_not_pad")["input_ids"][0].tolist() for t in TEXTS]
    assert model.text_tower.tokenizer.convert_ids_to_tokens(want[0][1:3]) == ["query", ":"]
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: tokenizers.js is checked in the browser tests only")
    script = tmp_path / "encode.mjs"
    script.write_text(NODE_ENCODE)
    short = [t for t, w in zip(TEXTS, want) if len(w) < model.text_tower.context_length]  # the page cuts longer ones
    got = subprocess.run([node, str(script), str(out / "vendor" / "tokenizers.min.mjs"), str(out / "tokenizer.json"),
                          json.dumps(short)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(got) == [w for t, w in zip(TEXTS, want) if t in short] and len(short) >= 5


def test_page_tokenizes_unigram_wordpiece_and_prefixed_tokenizers_as_the_python_tokenizers_do(built, served, browser):
    from tokenizers import Tokenizer

    open_page(browser, served)
    length = built[0].text_tower.context_length  # the page truncates at the exported model's length
    for name, text_json in _other_tokenizers():
        tok = Tokenizer.from_str(text_json)
        tok.no_padding()
        tok.enable_truncation(max_length=length)
        for text in TEXTS:
            got = browser.execute_script("return window.littune.tokenizeWithJson(JSON.parse(arguments[0]), arguments[1])",
                                         text_json, text)
            assert got == tok.encode(text).ids, (name, text)


def test_typed_query_ranks_first_the_image_littune_search_ranks_first(built, served, browser):
    from selenium.webdriver.common.keys import Keys

    model, index, _, _ = built
    open_page(browser, served)
    for query in ("a red apple", "猫が好きです"):
        hits = index.search_text(model, query, k=8)[0]
        assert hits[0].score - hits[1].score > 1e-4, "the fixture's top two are tied: pick another query"
        box = browser.find_element("id", "query")
        box.clear()
        box.send_keys(query, Keys.ENTER)
        wait(browser, lambda d: d.find_element("id", "results").get_attribute("data-query") == query)
        shown = browser.find_elements("css selector", "#results figure.hit")
        assert len(shown) == 8
        assert shown[0].get_attribute("data-key") == hits[0].key, query
        first = shown[0].find_element("tag name", "img")
        wait(browser, lambda d: first.get_attribute("naturalWidth") not in (None, "0"))  # its thumbnail loads
        scores = {f.get_attribute("data-key"): float(f.get_attribute("data-score")) for f in shown}
        for h in hits:
            assert scores[h.key] == pytest.approx(h.score, abs=1e-3), (query, h.key)
