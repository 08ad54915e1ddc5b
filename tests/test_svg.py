"""SVG drawings read as images (littune.data.svg): drawn at the tower's resize size on white through the
builders' renderer, everywhere an image is read -- embed (folder, CSV, JSONL, webdataset tar), classify,
serve, the Python API -- and hostile documents (external entities, entity bombs, references to other
files, huge sizes, deep nesting) refused or drawn harmlessly, each with a one-line reason."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from littune.cli import main
from littune.data.decode import BadImage, image_size, load_image

pytest.importorskip("resvg")

NS = 'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
#: a 40 x 20 drawing: a red left half, a blue disc on the right, the rest transparent (white once read)
WIDE = (f'<svg {NS} width="40" height="20" viewBox="0 0 40 20"><rect width="20" height="20" fill="#ff0000"/>'
        '<circle cx="30" cy="10" r="6" fill="#0000ff"/></svg>')
#: a square drawing with some detail, for comparing features with the builders' own rendering
SQUARE = (f'<svg {NS} width="64" height="64" viewBox="0 0 64 64"><rect x="4" y="4" width="24" height="56" '
          'fill="#e03020"/><circle cx="46" cy="20" r="12" fill="#2040d0"/><path d="M32 60 L60 36 L60 60 Z" '
          'fill="#20a040"/><path d="M8 8 L28 60" stroke="#000" stroke-width="2"/></svg>')
MARKER = "MARKER-7f3a9c"
#: a square tower run at 64 px, resized to 72 first: SVGs are drawn with their shorter side at 72
TOWER = {"type": "torch", "factory": "littune.towers.tiny:tiny_cnn",
         "preprocess": {"size": 64, "resize": 72, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def red_png(path: Path) -> Path:
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    return path


def hostile(root: Path) -> dict[str, tuple[str, str]]:
    """SVGs that must not be drawn as written: ``{file name: (reason, a phrase of the detail)}``."""
    root.mkdir(parents=True, exist_ok=True)
    secret = root / "secret.txt"
    secret.write_text(MARKER)
    laughs = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    docs = {
        "xxe.svg": (f'<!DOCTYPE svg [<!ENTITY x SYSTEM "file://{secret}">]><svg {NS} width="20" height="20">'
                    '<text y="15">&x;</text></svg>', ("unsafe", "external entities are not allowed")),
        "laughs.svg": (f'<!DOCTYPE svg [{laughs}]><svg {NS} width="20" height="20"><text>&l9;</text></svg>',
                       ("unsafe", "expand to more than")),
        "deep.svg": (f'<svg {NS} width="20" height="20">' + "<g>" * 100_000 + "</g>" * 100_000 + "</svg>",
                     ("unsafe", "nested more than")),
        "cut.svg": (WIDE[:-30], ("truncated", "stops early")),
    }
    for name, (text, _) in docs.items():
        (root / name).write_text(text)
    return {name: why for name, (_, why) in docs.items()}


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# -- decoding -----------------------------------------------------------------------------------------
def test_an_svg_is_drawn_with_its_shorter_side_at_render_to_keeping_its_aspect_on_white(tmp_path):
    (tmp_path / "wide.svg").write_text(WIDE)
    img = load_image(tmp_path / "wide.svg", render_to=64)
    assert img.mode == "RGB" and img.size == (128, 64)
    a = pixels(img)
    assert (a[32, 20] == (255, 0, 0)).all() and (a[32, 96] == (0, 0, 255)).all()
    assert (a[4, 124] == (255, 255, 255)).all()  # transparent -> white
    # known from its content: an XML prolog, a comment and the SVG DOCTYPE (never fetched), any name;
    # gzip'd (.svgz); UTF-16; bytes (a webdataset member)
    prolog = ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<!-- Created with Inkscape -->\n'
              '<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n')
    (tmp_path / "drawing.png").write_text(prolog + WIDE)
    (tmp_path / "wide.svgz").write_bytes(gzip.compress(WIDE.encode()))
    utf16 = ('<?xml version="1.0" encoding="UTF-16"?>' + WIDE).encode("utf-16")
    for src in (tmp_path / "drawing.png", tmp_path / "wide.svgz", utf16, WIDE.encode()):
        assert np.array_equal(pixels(load_image(src, render_to=64)), a), src
    # the default size: a 224 px tower's resize, 256; the info says the size it was drawn at
    default = load_image(tmp_path / "wide.svg")
    assert default.size == (512, 256) and default.info["littune_size"] == (512, 256)
    assert image_size(tmp_path / "wide.svg") == (512, 256)
    # markup or gzip data that holds no SVG is not an image
    for data in (b'<?xml version="1.0"?><feed/>', b"<!DOCTYPE html><html><body>x</body></html>",
                 gzip.compress(b"just some text, gzip'd")):
        with pytest.raises(BadImage) as e:
            load_image(data)
        assert e.value.reason == "not an image", (data[:20], e.value)


def test_a_simple_svg_is_drawn_as_the_builders_draw_it():
    from littune.builders.render import render_svg

    mine = load_image(SQUARE.encode(), render_to=72)
    theirs, renderer = render_svg(SQUARE, size=72)
    assert renderer == "resvg" and mine.size == theirs.size == (72, 72)
    assert np.abs(pixels(mine) - pixels(theirs)).max() <= 2


def test_internal_entities_are_expanded_as_illustrator_writes_them():
    doc = ('<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" '
           '"http://www.w3.org/TR/2001/REC-SVG-20010904/DTD/svg10.dtd" [\n'
           '\t<!ENTITY ns_svg "http://www.w3.org/2000/svg">\n\t<!ENTITY green "#00ff00">\n'
           '\t<!ENTITY colour "&green;">\n]>\n'
           '<svg xmlns="&ns_svg;" width="20" height="20"><rect width="20" height="20" fill="&colour;"/></svg>')
    img = load_image(doc.encode("latin-1"), render_to=32)
    assert img.size == (32, 32) and (pixels(img)[16, 16] == (0, 255, 0)).all()


def test_without_resvg_cairosvg_draws_the_drawing_and_a_file_with_internal_entities(monkeypatch):
    import sys

    pytest.importorskip("cairosvg")
    resvg_drawn = pixels(load_image(WIDE.encode(), render_to=64))
    monkeypatch.setitem(sys.modules, "resvg", None)
    img = load_image(WIDE.encode(), render_to=64)
    assert img.size == (128, 64) and np.abs(pixels(img) - resvg_drawn).mean() < 2
    # cairosvg alone refuses every entity (EntitiesForbidden): littune expands the internal ones first
    doc = ('<!DOCTYPE svg [<!ENTITY ns "http://www.w3.org/2000/svg"><!ENTITY green "#00ff00">]>'
           '<svg xmlns="&ns;" width="20" height="10"><rect width="20" height="10" fill="&green;"/></svg>')
    img = load_image(doc.encode(), render_to=32)
    assert img.size == (64, 32) and (pixels(img)[16, 32] == (0, 255, 0)).all()


def test_an_external_entity_is_refused_with_one_line_and_its_file_never_read(tmp_path):
    bad = hostile(tmp_path)
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "xxe.svg")
    assert e.value.reason == "unsafe" and "external entities are not allowed" in e.value.detail
    assert MARKER not in str(e.value) and "\n" not in str(e.value) and str(tmp_path / "xxe.svg") in str(e.value)
    # a FIFO as the entity's file: reading it would wait for a writer for ever
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    doc = f'<!DOCTYPE svg [<!ENTITY x SYSTEM "{fifo}">]><svg {NS} width="9" height="9"><text>&x;</text></svg>'
    assert _reason_within(doc.encode(), fifo, 20) == "unsafe"
    assert bad["xxe.svg"][0] == "unsafe"


def _reason_within(data: bytes, fifo: Path, seconds: float) -> str:
    """load_image's reason for ``data``, failing the test if it is still at work after ``seconds``
    (then the FIFO gets a writer, so that the thread ends)."""
    out: list[str] = []

    def run():
        try:
            load_image(data)
            out.append("drawn")
        except BadImage as e:
            out.append(e.reason)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail(f"load_image opened {fifo} (it waited for a writer)")
    return out[0]


def test_entity_bombs_and_deep_nesting_are_refused_quickly_and_the_process_lives(tmp_path):
    bad = hostile(tmp_path)
    for name, (reason, phrase) in bad.items():
        t0 = time.perf_counter()
        with pytest.raises(BadImage) as e:
            load_image(tmp_path / name)
        assert e.value.reason == reason and phrase in e.value.detail, (name, e.value)
        assert time.perf_counter() - t0 < 2.0, name
    # an entity bomb in the root's own attribute (expanded before any element handler) is refused as well
    laughs = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    with pytest.raises(BadImage, match="expand to more than"):
        load_image(f'<!DOCTYPE svg [{laughs}]><svg {NS} id="&l9;" width="9" height="9"/>'.encode())


def test_references_to_other_files_are_not_read_and_the_rest_is_drawn(tmp_path, monkeypatch):
    red = red_png(tmp_path / "red.png")
    monkeypatch.chdir(tmp_path)  # resvg reads a relative path from the working directory
    raster = base64.b64encode(red.read_bytes()).decode()
    for href, drawn in ((f"{red}", False), ("red.png", False), (f"file://{red}", False),
                        ("http://localhost:9/red.png", False), (f"data:image/png;base64,{raster}", True),
                        (f"data:;base64,{raster}", True)):
        doc = (f'<svg {NS} width="40" height="20"><image xlink:href="{href}" width="20" height="20"/>'
               '<rect x="20" width="20" height="20" fill="#0000ff"/></svg>')
        a = pixels(load_image(doc.encode(), render_to=20))
        assert (a[10, 30] == (0, 0, 255)).all(), href  # the rest of the drawing is there
        assert (a[10, 10] == ((255, 0, 0) if drawn else (255, 255, 255))).all(), href
    # a FIFO as the image: reading it would wait for ever
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    doc = f'<svg {NS} width="9" height="9"><image href="{fifo}" width="9" height="9"/><rect width="3" height="3"/>'
    doc += "</svg>"
    assert _reason_within(doc.encode(), fifo, 20) == "drawn"
    # an embedded raster counts against the pixel limit
    big = io.BytesIO()
    Image.new("L", (3000, 2000)).save(big, format="PNG")
    embedded = base64.b64encode(big.getvalue()).decode()
    doc = f'<svg {NS} width="9" height="9"><image href="data:image/png;base64,{embedded}"/></svg>'
    with pytest.raises(BadImage) as e:
        load_image(doc.encode(), max_pixels=1_000_000)
    assert e.value.reason == "too many pixels" and "3000x2000" in e.value.detail


def test_a_huge_declared_size_allocates_nothing(tmp_path):
    from littune.data.svg import MAX_SIDE

    t0 = time.perf_counter()
    huge = f'<svg {NS} width="1e9" height="1e9"><rect width="1e9" height="1e9" fill="#0000ff"/></svg>'
    img = load_image(huge.encode(), render_to=64)
    assert img.size == (64, 64) and (pixels(img)[32, 32] == (0, 0, 255)).all()
    thin = load_image(f'<svg {NS} width="1e9" height="1"><rect width="1e9" height="1" fill="#0000ff"/></svg>'.encode())
    assert thin.size == (MAX_SIDE, 1)  # the longer side is capped: a thin picture, not 256 x 256e9
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(BadImage) as e:  # an empty drawing
        load_image(f'<svg {NS} width="0" height="10"/>'.encode())
    assert e.value.reason == "corrupt"


def test_a_drawing_that_kills_the_renderer_is_too_large_and_the_next_one_draws():
    # resvg allocates a pattern tile / a filter region at its size on the page: 262 GB / 1e18 bytes here,
    # and Rust aborts the process when that fails
    pattern = (f'<svg {NS} width="10" height="10"><defs><pattern id="p" width="1" height="1" '
               'patternUnits="userSpaceOnUse" patternTransform="scale(10000)"><rect width="0.5" height="0.5"/>'
               '</pattern></defs><rect width="10" height="10" fill="url(#p)"/></svg>')
    region = (f'<svg {NS} width="10" height="10"><filter id="f" filterUnits="userSpaceOnUse" x="-1e7" y="-1e7" '
              'width="2e7" height="2e7"><feFlood flood-color="red"/></filter><rect width="10" height="10" '
              'filter="url(#f)"/></svg>')
    for doc in (pattern, region):
        with pytest.raises(BadImage) as e:
            load_image(doc.encode())
        assert e.value.reason == "too large" and "the renderer ended while drawing it" in e.value.detail
        assert load_image(WIDE.encode(), render_to=64).size == (128, 64)  # a new helper draws the next one


def test_a_drawing_that_takes_too_long_is_stopped(monkeypatch):
    from littune.builders import render_sandbox

    monkeypatch.setattr(render_sandbox, "SECONDS", 2.0)
    uses = "".join(f'<g id="a{i}"><use xlink:href="#a{i - 1}"/><use xlink:href="#a{i - 1}"/></g>' for i in range(1, 30))
    bomb = f'<svg {NS} width="9" height="9"><defs><rect id="a0" width="1" height="1"/>{uses}</defs>'
    bomb += '<use xlink:href="#a29"/></svg>'  # 2**29 rectangles: resvg refuses it, cairosvg works on for minutes
    t0 = time.perf_counter()
    with pytest.raises(BadImage) as e:
        load_image(bomb.encode())
    assert e.value.reason == "too large" and e.value.detail == "drawing it took longer than 2 s"
    assert time.perf_counter() - t0 < 15
    assert load_image(WIDE.encode(), render_to=64).size == (128, 64)


def test_a_renderer_process_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    import sys

    from littune.builders import render_sandbox

    render_sandbox._POOL.close()  # the helpers of the tests before
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(BadImage) as e:
        load_image(WIDE.encode())
    assert e.value.reason == "no renderer" and "the SVG renderer process did not start" in e.value.detail


def test_threads_draw_at_once_what_one_thread_draws():
    from concurrent.futures import ThreadPoolExecutor

    docs = [WIDE.replace("#0000ff", f"#0000{c:02x}").encode() for c in range(0, 256, 32)]
    alone = [pixels(load_image(d, render_to=48)) for d in docs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda d: pixels(load_image(d, render_to=48)), docs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


def test_missing_renderers_are_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    (tmp_path / "wide.svg").write_text(WIDE)
    monkeypatch.setitem(sys.modules, "resvg", None)  # import resvg / cairosvg: ImportError
    monkeypatch.setitem(sys.modules, "cairosvg", None)
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "wide.svg")
    assert e.value.reason == "no renderer" and "pip install 'littune[data]'" in e.value.detail
    assert str(e.value) == (f"{tmp_path / 'wide.svg'}: no renderer: "
                            "SVG needs `pip install 'littune[data]'` (resvg or cairosvg)")


# -- everywhere an image is read ---------------------------------------------------------------------
def _folder(root: Path) -> Path:
    """PNGs and SVGs (one gzip'd), and the builders' own 72 px PNG of the square drawing."""
    from data_fixtures import colour_image
    from littune.builders.render import render_png

    root.mkdir(parents=True)
    for i in range(3):
        colour_image(i, (48, 36)).save(root / f"photo{i}.png")
    (root / "square.svg").write_text(SQUARE)
    (root / "wide.svg").write_text(WIDE)
    (root / "wide_zipped.svgz").write_bytes(gzip.compress(WIDE.encode()))
    (root / "square_builder.png").write_bytes(render_png(SQUARE, size=72)[0])
    return root


def test_embed_reads_svgs_in_a_folder_and_refuses_the_hostile_ones(tmp_path, capsys):
    from littune.cache import EmbeddingCache
    from littune.fileio import read_skipped

    root, out = _folder(tmp_path / "data"), tmp_path / "cache"
    bad = hostile(root)
    rc = main(["embed", str(root), "--out", str(out), "--tower", json.dumps(TOWER), "--workers", "1", "-q"])
    assert rc == 0
    cache = EmbeddingCache.open(out)
    keys = [cache.key(i) for i in range(len(cache))]
    assert keys == ["photo0.png", "photo1.png", "photo2.png", "square.svg", "square_builder.png", "wide.svg",
                    "wide_zipped.svgz"]
    skipped = {Path(w).name: (r, d) for w, r, d in read_skipped(out / "skipped.tsv") if r != "no-caption"}
    assert {n: r for n, (r, _) in skipped.items()} == {n: r for n, (r, _) in bad.items()}
    f = cache.features(range(len(cache)))
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = f @ f.T
    svg, builder, zipped, wide = keys.index("square.svg"), keys.index("square_builder.png"), keys.index(
        "wide_zipped.svgz"), keys.index("wide.svg")
    assert sim[svg, builder] > 0.9999  # the same drawing as the builders render it
    assert sim[zipped, wide] > 0.9999
    assert max(sim[svg, i] for i in range(3)) < sim[svg, builder] - 0.01  # and not like the photos


def test_embed_reads_svgs_named_by_csv_jsonl_and_webdataset_tars(tmp_path):
    from littune.cache import EmbeddingCache

    root = tmp_path / "data"
    root.mkdir()
    (root / "square.svg").write_text(SQUARE)
    red_png(root / "red.png")
    (root / "pairs.csv").write_text("image,caption\nsquare.svg,a drawing\nred.png,a red square\n")
    (root / "pairs.jsonl").write_text('{"image": "square.svg", "caption": "a drawing"}\n'
                                      '{"image": "red.png", "caption": "a red square"}\n')
    with tarfile.open(root / "shard-000.tar", "w") as tf:
        for member, data in (("square.svg", SQUARE.encode()), ("square.txt", b"a drawing"),
                             ("red.png", (root / "red.png").read_bytes()), ("red.txt", b"a red square")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    features = {}
    for name in ("pairs.csv", "pairs.jsonl", "shard-000.tar"):
        out = tmp_path / f"cache-{name}"
        assert main(["embed", str(root / name), "--out", str(out), "--tower", json.dumps(TOWER), "--workers", "0",
                     "-q"]) == 0
        cache = EmbeddingCache.open(out)
        assert len(cache) == 2 and cache.manifest["skipped"] == 0, name
        features[name] = {cache.key(i): cache.features([i])[0] for i in range(2)}
    drawn = [next(v for k, v in f.items() if "square" in k) for f in features.values()]
    assert all(np.array_equal(d, drawn[0]) for d in drawn)  # the same pixels from a file and from a tar member


def test_the_python_api_draws_an_svg_at_the_models_resize_size(tmp_path, one_thread):
    import torch

    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel
    from littune.towers.fingerprint import tower_fingerprint

    (tmp_path / "square.svg").write_text(SQUARE)
    torch.manual_seed(0)
    config = LiTConfig(setting="Lu", image_tower=TOWER, text_tower=dict(TINY_TEXT), embed_dim=16)
    model = LiTModel.from_config(config, captions=CAPTIONS)
    got = model.encode_images(tmp_path / "square.svg")
    p = model.preprocess
    with torch.no_grad():
        want = model.encode_image(p.eval(load_image(tmp_path / "square.svg", render_to=p.resize_to)).unsqueeze(0))
        other = model.encode_image(p.eval(load_image(tmp_path / "square.svg")).unsqueeze(0))  # drawn at 256
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, other, atol=1e-3)
    # the drawing size follows from the pre-processing, which is in the tower's fingerprint
    resized = {**TOWER, "preprocess": {**TOWER["preprocess"], "resize": 96}}
    assert tower_fingerprint(TOWER) != tower_fingerprint(resized)


def test_training_on_the_fly_draws_an_svg_at_the_resize_size(tmp_path):
    import torch

    from littune.train.batches import OnTheFlyBatches
    from littune.data.records import Record
    from littune.data.preprocess import Preprocess

    (tmp_path / "square.svg").write_text(SQUARE)
    p = Preprocess(**TOWER["preprocess"])
    records = [Record(key=f"square{i}.svg", captions=["a drawing"], path=str(tmp_path / "square.svg"))
               for i in range(2)]
    batch = OnTheFlyBatches(records, p, global_batch=2, rank=0, world=1, seed=0, augment=False)[0]
    assert batch["skipped"] == [] and batch["captions"] == ["a drawing"] * 2
    want = p.eval(load_image(tmp_path / "square.svg", render_to=p.resize_to))
    assert all(torch.equal(px, want) for px in batch["pixels"])


def test_classify_reads_svgs_and_names_the_refused_ones_in_one_line(tmp_path, tiny_model, one_thread, capsys):
    tiny_model().save_pretrained(tmp_path / "model")
    root = _folder(tmp_path / "data")
    bad = hostile(root)
    images = [str(root / n) for n in ("square.svg", "wide_zipped.svgz", "photo0.png", "xxe.svg", "laughs.svg")]
    rc = main(["classify", "--model", str(tmp_path / "model"), "--labels", "red,green,blue", "--json", *images])
    cap = capsys.readouterr()
    assert rc == 1  # some images could not be read
    assert [r["image"] for r in json.loads(cap.out)] == images[:3]
    lines = cap.err.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("xxe.svg", "laughs.svg")):
        assert line.startswith(f"littune classify: cannot read {root / name}: unsafe: ") and bad[name][1] in line
    assert MARKER not in cap.err and MARKER not in cap.out


def test_eval_and_index_read_svgs_and_search_shows_them(tmp_path, tiny_model, one_thread, capsys):
    tiny_model().save_pretrained(tmp_path / "model")
    root = tmp_path / "classes"
    for name, colour in (("red", "#e02020"), ("blue", "#2040e0")):
        (root / name).mkdir(parents=True)
        for k in range(2):
            drawing = SQUARE.replace("#e03020", colour).replace('r="12"', f'r="{8 + 4 * k}"')
            (root / name / f"drawing{k}.svg").write_text(drawing)
        red_png(root / name / "square.png")
    rc = main(["eval", "zeroshot", str(root), "--model", str(tmp_path / "model"), "-q", "--out",
               str(tmp_path / "zs.json")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "zs.json").read_text())["littune"]["n_images"] == 6
    rc = main(["index", str(root), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "idx"), "-q",
               "--workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "indexed 6 images" in out
    query = root / "blue" / "drawing1.svg"
    assert main(["search", "--index", str(tmp_path / "idx"), "--image", str(query), "-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"image: {query}" and lines[1].split(maxsplit=2)[2] == str(query)  # finds itself first
    from littune.search import SearchIndex

    index = SearchIndex.open(tmp_path / "idx")
    shown = index.open_image(index.keys.index("blue/drawing1.svg"))  # what serve's preview re-encodes
    assert shown.size == (256, 256) and (pixels(shown)[128, 40] == (0x20, 0x40, 0xe0)).all()


def test_serve_classifies_an_uploaded_svg_and_refuses_an_external_entity(tmp_path, tiny_model, one_thread):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from littune.serve.app import create_app

    model = tiny_model()
    bad = hostile(tmp_path)
    labels = ["red", "blue", "a drawing"]
    with TestClient(create_app(model), base_url="http://localhost:8000") as c:
        r = c.post("/api/classify", files={"image": ("x.svg", SQUARE.encode(), "image/svg+xml")},
                   data={"labels": ", ".join(labels)})
        assert r.status_code == 200, r.text
        out = r.json()
        p = model.preprocess
        assert out["image"] == {"width": p.resize_to, "height": p.resize_to}  # drawn at the model's resize size
        want = model.classify(load_image(SQUARE.encode(), render_to=p.resize_to), labels)[0]
        for item in out["labels"]:
            assert item["probability"] == pytest.approx(float(want[labels.index(item["label"])]), abs=1e-5)
        r = c.post("/api/classify", files={"image": ("x.svg", (tmp_path / "xxe.svg").read_bytes(), "image/svg+xml")},
                   data={"labels": "a, b"})
        assert r.status_code == 400 and r.json()["detail"].startswith("unsafe: ") and MARKER not in r.text
        assert bad["xxe.svg"][0] == "unsafe"
        assert c.get("/api/health").status_code == 200
