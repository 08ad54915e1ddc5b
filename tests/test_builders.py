"""The offline dataset builders (`littune data emoji`, `littune data openclipart`) on small fixtures.

The fixtures are written by the tests: a fake ``node_modules`` with emojibase-data and a few Iconify
JSON icon sets (code-point sets and name-only sets), and a fake Openclipart SVG tree with the cases
the filters must catch. Images are rendered at 32 px so everything runs in a few seconds.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("resvg")

from littune.cli import main  # noqa: E402
from littune.builders import emoji, fetch, openclipart  # noqa: E402
from littune.builders.output import reason_and_detail  # noqa: E402
from littune.builders.render import (  # noqa: E402
    RenderError, _fit_size, _picture, _resvg, available_renderers, render_png, render_svg)
from littune.errors import LittuneError  # noqa: E402
from littune.fileio import read_skipped  # noqa: E402

SIZE = 32

# -- fake emojibase-data ----------------------------------------------------------------------------
# (hexcode, label, tags, group, subgroup)
EMOJI = [
    ("1F600", "grinning face", ["face", "grin", "grinning face"], 0, 1),
    ("1F642", "slightly smiling face", ["face", "smile"], 0, 1),
    ("2764", "red heart", ["heart", "love", "red"], 0, 2),
    ("1F44D", "thumbs up", ["+1", "hand", "thumb", "up"], 1, 3),
    ("1F431", "cat face", ["animal", "cat", "face", "pet"], 3, 4),
    ("1F436", "dog face", ["animal", "dog", "face", "pet"], 3, 4),
    ("1F404", "cow", ["animal", "cow"], 3, 4),
    ("1F40E", "horse", ["animal", "horse", "racing"], 3, 4),
    ("1F34E", "red apple", ["apple", "fruit", "red"], 4, 5),
    ("1F34F", "green apple", ["apple", "fruit", "green"], 4, 5),
    ("1F347", "grapes", ["fruit", "grape"], 4, 5),
    ("1F34C", "banana", ["banana", "fruit"], 4, 5),
    ("0023-FE0F-20E3", "keycap: #", ["keycap"], 8, 6),
    ("002A-FE0F-20E3", "keycap: *", ["keycap"], 8, 6),
    ("1F1EF-1F1F5", "flag: Japan", ["JP", "flag"], 9, 7),
    ("1F3FB", "light skin tone", ["skin tone", "type 1–2"], 2, 8),  # a component: not a concept
]
GERMAN = {"1F34E": ("roter Apfel", ["apfel", "obst", "rot"]), "1F431": ("Katzengesicht", ["katze", "tier"])}
UNICODE_NAMES = {"1F600": "GRINNING FACE", "2764": "HEAVY BLACK HEART", "1F431": "CAT FACE", "1F404": "COW",
                 "1F34E": "RED APPLE", "1F347": "GRAPES", "1F44D": "THUMBS UP SIGN"}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _emojibase(root: Path) -> None:
    pkg = root / "emojibase-data"
    _write_json(pkg / "package.json", {"name": "emojibase-data", "version": "17.0.0"})
    data = [{"label": "regional indicator A", "hexcode": "1F1E6", "emoji": "🇦", "type": 1}]
    for i, (hx, label, tags, g, sg) in enumerate(EMOJI):
        rec = {"label": label, "hexcode": hx, "tags": tags, "emoji": "".join(chr(int(p, 16)) for p in hx.split("-")),
               "group": g, "subgroup": sg, "order": i}
        if hx == "1F44D":
            rec["skins"] = [{"label": "thumbs up: light skin tone", "hexcode": "1F44D-1F3FB", "tone": 1}]
        data.append(rec)
    _write_json(pkg / "en" / "data.json", data)
    _write_json(pkg / "de" / "data.json", [{"label": v[0], "hexcode": k, "tags": v[1]} for k, v in GERMAN.items()])
    _write_json(pkg / "meta" / "groups.json", {
        "groups": {"0": "smileys-emotion", "1": "people-body", "2": "component", "3": "animals-nature",
                   "4": "food-drink", "8": "symbols", "9": "flags"},
        "subgroups": {str(i): f"sub-{i}" for i in range(10)}})
    _write_json(pkg / "meta" / "unicode-names.json", UNICODE_NAMES)
    _write_json(pkg / "en" / "shortcodes" / "github.json", {"1F642": "slight_smile", "1F34C": "banana"})


def _body(color: str) -> str:
    """A filled square with a black dot in the top-left corner (so a flip is visible)."""
    return (f'<rect x="2" y="2" width="28" height="28" fill="{color}"/>'
            '<circle cx="9" cy="9" r="5" fill="#000000"/>')


def _iconset(root: Path, package: str, prefix: str, icons: dict, chars: dict | None, aliases: dict | None = None,
             license: str = "CC-BY-4.0") -> None:
    pkg = root / package
    _write_json(pkg / "package.json", {"name": package, "version": "1.0.0"})
    _write_json(pkg / "icons.json", {"prefix": prefix, "icons": icons, "aliases": aliases or {},
                                     "width": 32, "height": 32})
    _write_json(pkg / "info.json", {"name": prefix, "license": {"spdx": license}, "author": {"name": "Tests"}})
    if chars is not None:
        _write_json(pkg / "chars.json", chars)


def _slug(label: str) -> str:
    return emoji.slugify(label)


COLORS = ["#e53935", "#43a047", "#1e88e5", "#fdd835", "#8e24aa", "#fb8c00", "#00acc1", "#6d4c41",
          "#c0ca33", "#5e35b1", "#d81b60", "#00897b", "#3949ab", "#f4511e", "#7cb342"]


def _fake_npm(root: Path) -> Path:
    nm = root / "node_modules"
    _emojibase(nm)
    concepts = [e for e in EMOJI if e[3] != 2]

    def chars_set(package, prefix, skip=(), shift=0):
        icons, chars = {}, {}
        for i, (hx, label, *_rest) in enumerate(concepts):
            if label in skip:
                continue
            name = _slug(label)
            icons[name] = {"body": _body(COLORS[(i + shift) % len(COLORS)])}
            # code points as iconify writes them: lower case, FE0F kept
            chars[hx.lower()] = name
        return icons, chars

    # Noto: no flags, and a banana that draws nothing (a render failure to report).
    icons, chars = chars_set("@iconify-json/noto", "noto", skip=("flag: Japan",))
    icons["banana"] = {"body": '<g fill="none"/>'}
    _iconset(nm, "@iconify-json/noto", "noto", icons, chars, license="Apache-2.0")
    # Twemoji: everything, plus a skin-tone variant, an alias, and an hFlip alias.
    icons, chars = chars_set("@iconify-json/twemoji", "twemoji", shift=3)
    icons["thumbs-up-medium-skin-tone"] = {"body": _body("#a1887f")}
    chars["1f44d-1f3fd"] = "thumbs-up-medium-skin-tone"
    _iconset(nm, "@iconify-json/twemoji", "twemoji", icons, chars,
             aliases={"apple": {"parent": "red-apple"}, "cow-facing-left": {"parent": "cow", "hFlip": True}})
    icons, chars = chars_set("@iconify-json/openmoji", "openmoji", shift=6)
    _iconset(nm, "@iconify-json/openmoji", "openmoji", icons, chars, license="CC-BY-SA-4.0")
    # FxEmoji: no chars.json; names are Unicode names without separators.
    fx = {"grinningface": "#ff0000", "heavyblackheart": "#00ff00", "catface": "#0000ff", "redapple": "#ffff00",
          "thumbsupsign": "#00ffff", "alienmonster": "#ff00ff"}
    _iconset(nm, "@iconify-json/fxemoji", "fxemoji", {k: {"body": _body(v)} for k, v in fx.items()}, None,
             license="Apache-2.0")
    # Streamline: numbered variants (the lowest number wins), a skin-tone name, a plain name.
    st = {"red-apple-2": "#111111", "red-apple-1": "#222222", "cow": "#333333", "thumbs-up-dark-skin-tone": "#444444",
          "grapes": "#555555"}
    _iconset(nm, "@iconify-json/streamline-emojis", "streamline-emojis",
             {k: {"body": _body(v)} for k, v in st.items()}, None)
    # EmojiOne: flag-for-x names and shortcodes.
    eo = {"flag-for-japan": "#bc002d", "slight-smile": "#ffcc4d", "dog-face": "#c69c6d"}
    _iconset(nm, "@iconify-json/emojione", "emojione", {k: {"body": _body(v)} for k, v in eo.items()}, {})
    return nm


DESIGNS = ["noto", "twemoji", "openmoji", "fxemoji", "streamline", "emojione"]


@pytest.fixture(scope="module")
def npm_dir(tmp_path_factory) -> Path:
    return _fake_npm(tmp_path_factory.mktemp("npm"))


@pytest.fixture(scope="module")
def emoji_build(npm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji") / "ds"
    m = emoji.build_emoji(out, designs=DESIGNS, packages=npm_dir, size=SIZE, workers=1, langs=["de"],
                          val_fraction=0.2, formats=["csv", "wds"], shard_size=10, cache=out.parent / "cache",
                          log=lambda msg: None)
    return out, m


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- rendering ------------------------------------------------------------------------------------
def test_render_square_on_white_keeps_aspect_and_is_deterministic():
    wide = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20" viewBox="0 0 40 20">'
            '<rect width="40" height="20" fill="#ff0000"/></svg>')
    img, name = render_svg(wide, size=SIZE)
    assert name == "resvg" and img.mode == "RGB" and img.size == (SIZE, SIZE)
    a = np.asarray(img)
    assert (a[0, :, :] == 255).all() and (a[-1, :, :] == 255).all()  # white bars above and below
    assert (a[SIZE // 2, :, 0] > 200).all() and (a[SIZE // 2, :, 1] < 60).all()  # red band, full width
    again, _ = render_svg(wide, size=SIZE)
    assert again.tobytes() == img.tobytes()
    tall = ('<svg xmlns="http://www.w3.org/2000/svg" width="20" height="40" viewBox="0 0 20 40">'
            '<rect width="20" height="40" fill="#ff0000"/></svg>')
    t = np.asarray(render_svg(tall, size=SIZE)[0])
    assert (t[:, 0] == 255).all() and (t[:, -1] == 255).all() and (t[:, SIZE // 2, 0] > 200).all()  # fitted by height


def test_render_draws_with_resvg_from_any_thread():
    # the binding's options belong to the thread that made them: one set shared by threads panicked, and
    # the drawing fell back to cairosvg without a word
    from concurrent.futures import ThreadPoolExecutor

    page = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="20" height="20" '
            'fill="#ff0000"/><circle cx="30" cy="10" r="6" fill="#0000ff"/></svg>')
    alone = render_png(page, size=SIZE)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: render_png(page, size=SIZE), range(6)))
    assert alone[1] == "resvg" and all(t == alone for t in together)


def test_render_png_on_white_matches_compositing_a_transparent_page():
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><circle cx="18" cy="18" r="15" '
           'fill="#3366cc" fill-opacity="0.6" stroke="#aa2200" stroke-width="2"/></svg>')
    png, name = render_png(svg, size=SIZE)
    assert name == "resvg" and png == render_png(svg, size=SIZE)[0]  # the same bytes every time
    img = Image.open(io.BytesIO(png))
    assert img.mode == "RGBA" and img.size == (SIZE, SIZE) and img.getchannel("A").getextrema() == (255, 255)
    on_page = np.asarray(_picture(_resvg, svg, SIZE, False, False, 0.04), dtype=int)  # RENDER_VERSION 2's way
    diff = np.abs(np.asarray(img.convert("RGB"), dtype=int) - on_page)
    assert diff.max() <= 4 and diff.mean() < 0.2  # premultiplied 8-bit rounding: a level here and there
    assert np.abs(np.asarray(img.convert("RGB"), dtype=int) - 255).max() > 100  # something was drawn
    with pytest.raises(RenderError, match="resvg: nothing drawn on the page \\(blank\\)"):
        render_png('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9" '
                   'fill="white"/></svg>', size=SIZE)


def test_render_crop_keeps_what_lies_beyond_the_page_unseen():
    # a wide page filled red, and a blue square below it, outside the page (viewBox): the cropped picture
    # fills the square with the page's width, and the white above and below it stays white.
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="100" height="50" viewBox="0 0 100 50">'
           '<rect width="100" height="50" fill="#ff0000"/><rect y="55" width="100" height="60" fill="#0000ff"/></svg>')
    for renderers in (["resvg"], ["cairosvg"]):
        if renderers[0] not in available_renderers():
            continue
        a = np.asarray(render_svg(svg, size=SIZE, crop=True, renderers=renderers)[0], dtype=int)
        red = (a[..., 0] > 200) & (a[..., 2] < 60)
        assert not ((a[..., 2] > 200) & (a[..., 0] < 60)).any(), renderers  # no blue
        assert red[SIZE // 2].sum() >= SIZE * 0.8 and (a[0] == 255).all() and (a[-1] == 255).all(), renderers


def test_fit_size_is_resvgs_width_and_height_arithmetic():
    # tiny-skia's IntSize::scale_to_width/height: float32, rounded up; the scale per axis from the sizes
    k = float(np.float32(224) / np.float32(36))
    assert _fit_size(36, 36, 224, None) == (224, 224, k, k)
    W, H, sx, sy = _fit_size(3, 1, 224, None)
    assert (W, H) == (224, 75) and sx == float(np.float32(224) / np.float32(3)) and sy == 75.0
    assert _fit_size(1, 3, None, 224)[:2] == (75, 224)
    with pytest.raises(ValueError, match="empty"):
        _fit_size(0, 10, 224, None)


def test_render_units_crop_and_fallback():
    # mm sizes without a viewBox (resvg-py needs dpi set), a small drawing on a big page: crop fills it.
    page = ('<svg xmlns="http://www.w3.org/2000/svg" width="210mm" height="297mm">'
            '<circle cx="400" cy="500" r="30" fill="#0000ff"/></svg>')
    plain, _ = render_svg(page, size=SIZE)
    cropped, _ = render_svg(page, size=SIZE, crop=True)
    blue = lambda im: (np.asarray(im)[..., 2] > 200) & (np.asarray(im)[..., 0] < 80)  # noqa: E731
    assert blue(plain).sum() < 10 and blue(cropped).sum() > 0.5 * SIZE * SIZE
    if "cairosvg" in available_renderers():
        img, name = render_svg(page, size=SIZE, renderers=["cairosvg"], crop=True)
        assert name == "cairosvg" and blue(img).sum() > 0.5 * SIZE * SIZE
    with pytest.raises(RenderError, match="resvg: not well-formed XML"):
        render_svg("<svg this is not xml", size=SIZE)
    with pytest.raises(RenderError, match="resvg: .*NoRootNode"):  # well-formed, not SVG: resvg's own error
        render_svg("<html/>", size=SIZE)
    with pytest.raises(RenderError, match="nothing drawn"):
        render_svg('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><g/></svg>', size=SIZE)


# -- emoji: parsing and matching --------------------------------------------------------------------
def test_concepts_captions_and_languages(npm_dir):
    concepts = emoji.load_concepts(npm_dir / "emojibase-data", ["de"])
    labels = [c.label for c in concepts]
    assert "light skin tone" not in labels and "regional indicator A" not in labels
    assert len(concepts) == len(EMOJI) - 1
    ids = {c.label: c.id for c in concepts}
    assert ids["red apple"] == "red-apple" and ids["flag: Japan"] == "flag-japan"
    assert ids["keycap: #"] == "keycap-0023-20e3" and ids["keycap: *"] == "keycap-002a-20e3"  # slug collision
    by = {c.label: c for c in concepts}
    assert by["flag: Japan"].name == "flag of Japan" and by["keycap: #"].name == "keycap #"
    assert by["red heart"].hexcode == "2764" and by["keycap: #"].hexcode == "0023-20e3"
    caps = emoji.caption_variants(concepts, ["de"])
    assert caps["red-apple"] == ["red apple", "a red apple", "red apple emoji", "apple, fruit, red",
                                 "roter Apfel", "apfel, obst, rot"]
    assert caps["flag-japan"][:2] == ["flag of Japan", "the flag of Japan"]
    assert "keycap" not in caps["keycap-0023-20e3"]  # "keycap" names two concepts: no tags-only caption
    assert emoji.with_article("ogre") == "an ogre" and emoji.with_article("unicorn") == "a unicorn"
    with pytest.raises(LittuneError, match="no locale xx"):
        emoji.load_concepts(npm_dir / "emojibase-data", ["xx"])


def test_iconset_alias_flip_and_matching(npm_dir):
    tw = emoji.IconSet(npm_dir / "@iconify-json" / "twemoji")
    assert tw.license == "CC-BY-4.0" and tw.resolve("nope") is None
    assert tw.resolve("apple")["body"] == tw.resolve("red-apple")["body"]
    flipped = tw.svg("cow-facing-left")
    assert "scale(-1 1)" in flipped and 'viewBox="0 0 32 32"' in flipped
    a = np.asarray(render_svg(tw.svg("cow"), size=SIZE)[0])
    b = np.asarray(render_svg(flipped, size=SIZE)[0])
    mirrored = np.abs(a[:, ::-1].astype(int) - b.astype(int)).mean()
    assert mirrored < 2 and np.abs(a.astype(int) - b.astype(int)).mean() > 10 * max(mirrored, 1)

    concepts = emoji.load_concepts(npm_dir / "emojibase-data")
    key = {c.label: c.hexcode for c in concepts}
    index = emoji.NameIndex(concepts, [tw], npm_dir / "emojibase-data")
    got, unused = emoji.match_icons(tw, concepts, index)
    assert got[key["red heart"]] == "red-heart" and got[key["keycap: #"]] == "keycap"  # FE0F normalised
    assert ("thumbs-up-medium-skin-tone", "skin-tone variant") in unused
    fx = emoji.IconSet(npm_dir / "@iconify-json" / "fxemoji")
    got, unused = emoji.match_icons(fx, concepts, index)
    assert got == {key["grinning face"]: "grinningface", key["red heart"]: "heavyblackheart",
                   key["cat face"]: "catface", key["red apple"]: "redapple", key["thumbs up"]: "thumbsupsign"}
    assert [n for n, _ in unused] == ["alienmonster"]
    st = emoji.IconSet(npm_dir / "@iconify-json" / "streamline-emojis")
    got, unused = emoji.match_icons(st, concepts, index)
    assert got[key["red apple"]] == "red-apple-1" and got[key["cow"]] == "cow" and got[key["grapes"]] == "grapes"
    assert dict(unused)["thumbs-up-dark-skin-tone"] == "skin-tone variant"
    eo = emoji.IconSet(npm_dir / "@iconify-json" / "emojione")
    got, _ = emoji.match_icons(eo, concepts, index)
    assert got == {key["flag: Japan"]: "flag-for-japan", key["slightly smiling face"]: "slight-smile",
                   key["dog face"]: "dog-face"}


def test_design_families_and_heldout_resolution():
    assert emoji.resolve_designs(None) == [d for d in emoji.DESIGNS if d != "fluent-3d"]
    assert emoji.resolve_designs(["fluent"]) == ["fluent-flat", "fluent-high-contrast", "fluent-3d"]
    # a held-out design stands for its whole family
    assert emoji.resolve_heldout(["noto-v1"], ["noto", "noto-v1", "twemoji"]) == ["noto"]
    assert emoji.resolve_heldout(None, ["noto", "twemoji"]) == ["twemoji"]
    with pytest.raises(LittuneError, match="leaves no design to train on"):
        emoji.resolve_heldout(["twemoji"], ["twemoji"])
    with pytest.raises(LittuneError, match="unknown design 'comic-sans'"):
        emoji.resolve_designs(["comic-sans"])
    with pytest.raises(LittuneError, match="has no selected design"):
        emoji.resolve_heldout(["fxemoji"], ["noto", "twemoji"])


# -- emoji: the build -------------------------------------------------------------------------------
def test_emoji_build_layout_and_splits(emoji_build):
    out, m = emoji_build
    assert m["train_designs"] == ["noto", "fxemoji", "streamline", "emojione"]
    assert m["heldout_designs"] == ["twemoji", "openmoji"]
    img = Image.open(out / "images" / "twemoji" / "red-apple.png")
    assert img.size == (SIZE, SIZE) and img.mode == "RGBA"  # drawn on white by resvg: opaque everywhere
    assert img.getchannel("A").getextrema() == (255, 255)
    assert not (out / "images" / "noto" / "banana.png").exists()  # it drew nothing
    held = set(m["concepts"]["heldout"])
    train_concepts = set(m["concepts"]["train"])
    assert held and train_concepts and not held & train_concepts
    assert len(held) == 6  # at least one per emoji group: 6 groups with concepts
    train = _rows(out / "train.csv")
    val = _rows(out / "val.csv")
    assert train and val and set(train[0]) == {"image", "caption", "lang"}  # langs=["de"]: a language column
    for rows in (train, val):
        for r in rows:
            _, design, file = r["image"].split("/")
            assert design in m["train_designs"] and file[:-4] in train_concepts
            assert (out / r["image"]).is_file()
    assert not {r["image"] for r in train} & {r["image"] for r in val}
    assert m["counts"]["train_images"] == len({r["image"] for r in train})
    assert m["counts"]["train_rows"] == len(train) and m["counts"]["val_rows"] == len(val)
    apple_rows = [r["caption"] for r in train + val if r["image"].endswith("/red-apple.png")]
    if "red-apple" in train_concepts:
        assert "roter Apfel" in apple_rows and "a red apple" in apple_rows
        langs = {r["caption"]: r["lang"] for r in train + val if r["image"].endswith("/red-apple.png")}
        assert langs["roter Apfel"] == "de" and langs["a red apple"] == "en"

    # evaluation folders: class folders in sorted order = classnames.txt
    for split in ("heldout_designs", "heldout_concepts", "heldout_both"):
        folder = out / "eval" / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        names = (folder / "classnames.txt").read_text().splitlines()
        assert len(names) == len(classes)
        designs = {f.stem for c in classes for f in (folder / c).iterdir()}
        assert designs <= set(m["heldout_designs"] if split != "heldout_concepts" else m["train_designs"])
        for r in _rows(out / "eval" / f"retrieval_{split}.csv"):
            assert (out / "eval" / r["image"]).is_file()
    hd = sorted(p.name for p in (out / "eval" / "heldout_designs").iterdir() if p.is_dir())
    assert len(hd) == len(EMOJI) - 1  # every concept, drawn by twemoji
    assert (out / "eval" / "heldout_designs" / "flag-japan" / "openmoji.png").is_file()
    names = (out / "eval" / "heldout_designs" / "classnames.txt").read_text().splitlines()
    assert names[hd.index("flag-japan")] == "flag of Japan"
    assert set(p.name for p in (out / "eval" / "heldout_concepts").iterdir() if p.is_dir()) <= held
    assert set(p.name for p in (out / "eval" / "heldout_both").iterdir() if p.is_dir()) <= held

    assert (out / "skipped.tsv").read_text().splitlines()[0] == "where\treason\tdetail"
    rows = read_skipped(out / "skipped.tsv")
    assert len(rows) == m["counts"]["skipped"] and all(len(r) == 3 and r[0] and r[1] for r in rows)
    skipped = {where: (reason, detail) for where, reason, detail in rows}
    assert skipped["image noto/banana"][0] == "render failed" and "nothing drawn" in skipped["image noto/banana"][1]
    assert skipped["icon twemoji:thumbs-up-medium-skin-tone"] == ("skin-tone variant", "")
    assert skipped["icon fxemoji:alienmonster"] == ("icon name matches no emoji concept", "")
    assert skipped["icon streamline:red-apple-2"] == ("another icon of this set drew the same concept", "red-apple-1")
    card = (out / "datacard.md").read_text()
    for reason, n in Counter(r[1] for r in rows).items():  # the datacard counts the reason column
        assert f"| {reason} | {n} |" in card
    assert "| fxemoji |" in card and "Held-out design families (never trained on): twemoji, openmoji" in card
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == m["counts"] and manifest["seed"] == 0
    assert manifest["designs"]["openmoji"]["license"] == "CC-BY-SA-4.0"


def test_emoji_language_eval_files_name_the_same_classes_in_each_language(emoji_build, npm_dir):
    out, m = emoji_build
    concepts = {c.id: c for c in emoji.load_concepts(npm_dir / "emojibase-data", ["de"])}
    for split in ("heldout_designs", "heldout_concepts"):
        folder = out / "eval" / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        german = (folder / "classnames.de.txt").read_text(encoding="utf-8").splitlines()
        assert len(german) == len(classes)
        named = [cid for cid in classes if "de" in concepts[cid].translations]
        for cid, name in zip(classes, german):
            assert name == (concepts[cid].translations["de"][0] if cid in named else concepts[cid].name)
        assert m["counts"]["eval"][split]["languages"]["de"]["english_names"] == len(classes) - len(named)
        rows = _rows(out / "eval" / f"retrieval_{split}.de.csv")
        assert bool(rows) == bool(named) and all((out / "eval" / r["image"]).is_file() for r in rows)
        assert {r["image"].split("/")[1] for r in rows} == set(named)  # only concepts with German captions
        english = {c.casefold() for cid in classes for c in emoji.caption_variants([concepts[cid]])[cid]}
        assert not {r["caption"].casefold() for r in rows} & english


def test_emoji_no_heldout_caption_is_trained_on(emoji_build, npm_dir):
    out, m = emoji_build
    concepts = [c for c in emoji.load_concepts(npm_dir / "emojibase-data", ["de"])]
    caps = emoji.caption_variants(concepts, ["de"])
    held_caps = {c.casefold() for cid in m["concepts"]["heldout"] for c in caps[cid]}
    trained = {r["caption"].casefold() for r in _rows(out / "train.csv") + _rows(out / "val.csv")}
    assert held_caps and not held_caps & trained


def test_emoji_webdataset_shards(emoji_build):
    out, m = emoji_build
    shards = sorted((out / "wds" / "train").glob("*.tar"))
    assert shards[0].name == "train-000000.tar" and (out / "wds" / "val" / "val-000000.tar").is_file()
    assert len(shards) == m["counts"]["train_shards"] >= 1
    members = []
    for s in shards:
        with tarfile.open(s) as tar:
            members += [(t.name, tar.extractfile(t).read()) for t in tar.getmembers()]
    keys = sorted({n.split(".")[0] for n, _ in members})
    assert len(keys) == m["counts"]["train_images"]
    data = dict(members)
    key = keys[0]
    meta = json.loads(data[f"{key}.json"])
    assert meta["design"] + "__" + meta["concept"] == key and meta["captions"]
    assert len(meta["langs"]) == len(meta["captions"]) and set(meta["langs"]) <= {"en", "de"}
    assert Image.open(io.BytesIO(data[f"{key}.png"])).size == (SIZE, SIZE)
    # read back, the shards give every image the captions and languages train.csv gives it
    from littune.data.sources import open_source

    shards = {r.key: list(zip(r.captions, r.langs)) for r in open_source(str(out / "wds" / "train")).records()}
    table = {f"{Path(r.key).parent.name}__{Path(r.key).stem}": list(zip(r.captions, r.langs))
             for r in open_source(str(out / "train.csv")).records()}
    assert shards == table and any(lang == "de" for pairs in shards.values() for _, lang in pairs)


def test_emoji_rebuild_is_idempotent_and_prunes(emoji_build, npm_dir):
    out, m = emoji_build
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    train_bytes = (out / "train.csv").read_bytes()
    m2 = emoji.build_emoji(out, designs=DESIGNS, packages=npm_dir, size=SIZE, workers=1, langs=["de"],
                           val_fraction=0.2, formats=["csv", "wds"], shard_size=10, log=lambda msg: None)
    assert m2["render_counts"] == {"cached": len(before)}
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    assert (out / "train.csv").read_bytes() == train_bytes
    assert m2["counts"] == m["counts"]


def test_emoji_parallel_render_changed_icons_and_limit(npm_dir, tmp_path, emoji_build):
    out_full, _ = emoji_build
    out = tmp_path / "small"
    npm = tmp_path / "npm"
    shutil.copytree(npm_dir, npm)
    kw = dict(designs=["noto", "twemoji"], heldout_designs=["twemoji"], heldout_concepts=0.0, packages=npm,
              size=SIZE, workers=2, log=lambda msg: None)
    m = emoji.build_emoji(out, limit_concepts=5, **kw)
    assert m["counts"]["concepts"] == 5 and m["counts"]["heldout_concepts"] == 0
    assert not (out / "eval" / "heldout_concepts").exists()
    pngs = sorted((out / "images").rglob("*.png"))
    # the process pool draws the same bytes as the single-process build
    assert pngs and all((out_full / p.relative_to(out)).read_bytes() == p.read_bytes() for p in pngs)
    # a changed icon is re-rendered, and only that one
    icons_path = npm / "@iconify-json" / "twemoji" / "icons.json"
    icons = json.loads(icons_path.read_text())
    changed = sorted(p for p in pngs if p.parent.name == "twemoji")[0]
    icons["icons"][changed.stem]["body"] = _body("#000000")
    icons_path.write_text(json.dumps(icons))
    before = changed.read_bytes()
    m = emoji.build_emoji(out, limit_concepts=5, **kw)
    assert m["render_counts"] == {"cached": len(pngs) - 1, "resvg": 1} and changed.read_bytes() != before
    # a smaller rebuild removes the images it no longer uses
    m = emoji.build_emoji(out, limit_concepts=2, **kw)
    assert len(list((out / "images").rglob("*.png"))) == m["counts"]["images"] <= 4


def test_emoji_errors(npm_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LittuneError, match="not a littune dataset"):
        emoji.build_emoji(foreign, designs=DESIGNS, packages=npm_dir, log=lambda msg: None)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    with pytest.raises(LittuneError, match="missing npm package"):
        emoji.build_emoji(tmp_path / "a", designs=["noto", "fluent-flat"], packages=npm_dir, log=lambda msg: None)
    broken = tmp_path / "broken"
    shutil.copytree(npm_dir, broken)
    (broken / "@iconify-json" / "noto" / "icons.json").write_text("{not json")
    with pytest.raises(LittuneError, match=r"noto/icons.json: not valid JSON"):
        emoji.build_emoji(tmp_path / "b", designs=DESIGNS, packages=broken, size=SIZE, log=lambda msg: None)
    with pytest.raises(LittuneError, match="--format"):
        emoji.build_emoji(tmp_path / "c", designs=DESIGNS, packages=npm_dir, formats=["parquet"], log=lambda msg: None)


def test_fetch_npm_caches_with_npm_pack(npm_dir, tmp_path, monkeypatch):
    """The cache path of fetch_npm, with a stand-in `npm` that packs tarballs from the fixture folder."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "npm-calls.txt"
    script = bindir / "npm"
    script.write_text(f"""#!{sys.executable}
import json, sys, tarfile, pathlib
args = sys.argv[1:]
open({str(log)!r}, "a").write(" ".join(args) + "\\n")
dest = pathlib.Path(args[args.index("--pack-destination") + 1])
out = []
for spec in args[args.index("--pack-destination") + 2:]:
    name = spec.rsplit("@", 1)[0] if spec.rfind("@") > 0 else spec
    src = pathlib.Path({str(npm_dir)!r}) / name
    fn = name.replace("@", "").replace("/", "-") + ".tgz"
    with tarfile.open(dest / fn, "w:gz") as t:
        t.add(src, arcname="package")
    out.append({{"name": name, "version": "1.0.0", "filename": fn}})
print(json.dumps(out))
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    cache = tmp_path / "cache"
    got = fetch.fetch_npm(["@iconify-json/twemoji", "emojibase-data"], cache, log=lambda m: None)
    assert got["@iconify-json/twemoji"] == cache / "npm" / "@iconify-json" / "twemoji"
    assert (got["emojibase-data"] / "en" / "data.json").is_file()
    again = fetch.fetch_npm(["@iconify-json/twemoji", "emojibase-data"], cache, log=lambda m: None)
    assert again == got and len(log.read_text().splitlines()) == 1  # second call downloads nothing
    fetch.fetch_npm(["@iconify-json/twemoji@1.0.0", "@iconify-json/noto"], cache, log=lambda m: None)
    assert log.read_text().splitlines()[-1].endswith("@iconify-json/noto")  # only the missing one
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LittuneError, match="npm not found"):
        fetch.fetch_npm(["@iconify-json/openmoji"], cache, log=lambda m: None)


def test_cli_emoji(npm_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["data", "emoji", "--out", str(out), "--packages", str(npm_dir), "--designs", "noto,twemoji",
               "--heldout-designs", "twemoji", "--size", str(SIZE), "--workers", "1", "--limit-concepts", "4"])
    assert rc == 0 and (out / "train.csv").is_file()
    assert "held-out designs twemoji" in capsys.readouterr().out
    rc = main(["data", "emoji", "--out", str(tmp_path / "x"), "--packages", str(npm_dir), "--designs", "nope"])
    assert rc == 2 and "unknown design 'nope'" in capsys.readouterr().err


# -- openclipart ------------------------------------------------------------------------------------
CC = "http://web.resource.org/cc/PublicDomain"


def _clip(title: str, body: str, keywords=(), desc: str = "", creator: str = "Jane Doe", license: str = CC,
          size: str = 'width="100" height="100"') -> str:
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/"
     xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" {size}>
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title><dc:description>{desc}</dc:description>
    <dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
    <cc:license rdf:resource="{license}"/>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""


SHAPE = '<rect x="10" y="10" width="80" height="80" fill="{}"/>'
THINGS = ["Red ball", "Blue car", "Green tree", "Yellow sun", "Purple flower", "Orange fish", "Brown bear",
          "Grey cloud", "Pink pig", "Black hat", "White boat", "Gold crown", "Silver spoon", "Teal cup"]


def _fake_openclipart(root: Path) -> Path:
    svg = root / "usr" / "share" / "openclipart" / "svg"

    def put(rel, text):
        p = svg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return p

    cat = put("animals/cat_drawing_01.svg", _clip("Clipart by Jane Doe - Black_cat", SHAPE.format("#000"),
                                                  ["hash", "", "cat", "animal", "Jane Doe", "0x935a874"],
                                                  desc="A black cat sitting on a mat"))
    (svg / "animals" / "cat_link.svg").symlink_to("cat_drawing_01.svg")
    shutil.copyfile(cat, svg / "animals" / "cat_drawing_01_copy.svg")
    put("animals/small_dog_01.svg", _clip("Small dog", '<circle cx="400" cy="500" r="40" fill="#8B4513"/>',
                                          ["dog"], size='width="210mm" height="297mm"'))
    for i, thing in enumerate(THINGS):
        put(f"things/{thing.lower().replace(' ', '_')}.svg",
            _clip(thing, SHAPE.format(COLORS[i % len(COLORS)]), ["thing"], desc="Various Cliparts"))
    for s, color in zip("abc", ("#123456", "#654321", "#abcdef")):
        put(f"shapes/callouts/callout_{s}.svg", _clip("Callouts", SHAPE.format(color), ["callout"]))
    put("computer/icons/lemon-theme/save.svg", _clip("Lemon SVG theme", SHAPE.format("#ff0")))
    put("shapes/stars/star_5pt.svg", _clip("gramastar", SHAPE.format("#ff0")))
    put("special/gradients/g1.svg", _clip("gradient", SHAPE.format("#0ff")))
    put("misc/untitled.svg", _clip("", SHAPE.format("#f00")))
    put("misc/photo.svg", _clip("Photo", '<image xlink:href="holiday.jpg" width="100" height="100"/>'))
    png = io.BytesIO()
    Image.new("RGB", (4, 4), (0, 128, 0)).save(png, format="PNG")
    put("misc/embedded.svg", _clip("Embedded picture", '<image xlink:href="data:image/png;base64,'
                                   + base64.b64encode(png.getvalue()).decode() + '" width="100" height="100"/>'))
    put("misc/broken.svg", "<svg><metadata>")
    put("misc/gpl.svg", _clip("Penguin", SHAPE.format("#000"), license="http://creativecommons.org/licenses/GPL/2.0/"))
    put("misc/empty.svg", _clip("Nothing here", "<g/>"))
    return root


@pytest.fixture(scope="module")
def clipart_tree(tmp_path_factory) -> Path:
    return _fake_openclipart(tmp_path_factory.mktemp("openclipart"))


def test_openclipart_metadata_cleaning(clipart_tree):
    root = clipart_tree / "usr" / "share" / "openclipart" / "svg"
    clip, reason = openclipart.parse_clip(root / "animals" / "cat_drawing_01.svg", root)
    assert reason is None and clip.id == "animals__cat_drawing_01"
    assert clip.title == "Black cat" and clip.keywords == ["cat", "animal"]
    assert clip.captions() == ["Black cat", "Black cat, cat, animal", "A black cat sitting on a mat"]
    assert openclipart.parse_clip(root / "misc" / "photo.svg", root)[1].startswith("references an external image")
    assert openclipart.parse_clip(root / "misc" / "embedded.svg", root)[1] is None
    assert openclipart.parse_clip(root / "misc" / "broken.svg", root)[1].startswith("not valid XML")
    assert openclipart.parse_clip(root / "misc" / "gpl.svg", root)[1].startswith("licence is not public domain")


def test_openclipart_build(clipart_tree, tmp_path):
    out = tmp_path / "oc"
    m = openclipart.build_openclipart(out, source=clipart_tree, size=SIZE, workers=1, fractions=(0.6, 0.2, 0.2),
                                      formats=["csv", "wds"], log=lambda msg: None)
    c = m["counts"]
    usable = 1 + 1 + len(THINGS) + 3 + 1  # cat, dog, things, callouts, embedded
    assert c["images"] == usable and c["files"] == 30
    assert c["train_images"] + c["val_images"] + c["test_images"] == usable
    assert min(c["train_images"], c["val_images"], c["test_images"]) > 0
    split_of = {}
    for split in ("train", "val", "test"):
        rows = _rows(out / f"{split}.csv")
        assert rows and all((out / r["image"]).is_file() for r in rows)
        for r in rows:
            assert split_of.setdefault(r["image"], split) == split  # an image is in one split only
    callouts = {split_of[f"images/shapes__callouts__callout_{s}.png"] for s in "abc"}
    assert len(callouts) == 1  # a series stays in one split
    caps = [r["caption"] for r in _rows(out / f"{callouts.pop()}.csv")]
    assert "callout a (Callouts)" in caps and "Various Cliparts" not in caps  # boilerplate description dropped
    retrieval = _rows(out / "retrieval_test.csv")
    assert len({r["caption"] for r in retrieval}) == len(retrieval) == c["retrieval_test_rows"]
    dog = np.asarray(Image.open(out / "images" / "animals__small_dog_01.png").convert("RGB"))
    assert dog.shape == (SIZE, SIZE, 3) and ((dog[..., 0] > 100) & (dog[..., 2] < 60)).mean() > 0.4  # cropped
    skipped = {where: (reason, detail) for where, reason, detail in read_skipped(out / "skipped.tsv")}
    assert skipped["animals/cat_link.svg"] == ("duplicate", "symlink to animals/cat_drawing_01.svg")
    assert skipped["animals/cat_drawing_01_copy.svg"] == ("duplicate", "same bytes as animals/cat_drawing_01.svg")
    assert skipped["computer/icons/lemon-theme/save.svg"] == ("icon", "icon theme category")
    assert skipped["shapes/stars/star_5pt.svg"] == ("star shape", "generated series")
    assert skipped["special/gradients/g1.svg"] == ("gradient swatch, not a drawing", "")
    assert skipped["misc/untitled.svg"] == ("no title", "")
    assert skipped["misc/empty.svg"][0] == "render failed" and "nothing drawn" in skipped["misc/empty.svg"][1]
    assert "misc/broken.svg" in skipped and "misc/photo.svg" in skipped and "misc/gpl.svg" in skipped
    assert skipped["misc/gpl.svg"] == ("licence is not public domain", "http://creativecommons.org/licenses/GPL/2.0/")
    assert (out / "skipped.tsv").read_text().splitlines()[0] == "where\treason\tdetail"
    assert len(skipped) == c["skipped"]
    card = (out / "datacard.md").read_text()
    assert "public-domain" in card and f"| train | {c['train_images']} |" in card
    assert sorted(p.relative_to(out / "wds").as_posix() for p in (out / "wds").rglob("*.tar")) == [
        "test/test-000000.tar", "train/train-000000.tar", "val/val-000000.tar"]

    # idempotent: nothing re-rendered, same tables
    test_csv = (out / "test.csv").read_bytes()
    m2 = openclipart.build_openclipart(out, source=clipart_tree, size=SIZE, workers=1, fractions=(0.6, 0.2, 0.2),
                                       formats=["csv"], log=lambda msg: None)
    assert m2["render_counts"] == {"cached": usable} and (out / "test.csv").read_bytes() == test_csv
    assert not (out / "wds").exists()


def test_openclipart_from_deb_and_cli(clipart_tree, tmp_path, capsys):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    pkg = tmp_path / "pkg"
    shutil.copytree(clipart_tree, pkg, symlinks=True)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text("Package: openclipart-svg\nVersion: 1:0.18-test\nArchitecture: all\n"
                                            "Maintainer: Tests <t@example.org>\nDescription: test clip art\n")
    deb = tmp_path / "openclipart-svg_0.18-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True)
    out = tmp_path / "oc"
    rc = main(["data", "openclipart", "--out", str(out), "--source", str(deb), "--cache", str(tmp_path / "cache"),
               "--size", str(SIZE), "--workers", "1", "--limit", "5", "--split", "0.6,0.2,0.2"])
    assert rc == 0 and "5 drawings" in capsys.readouterr().out
    complete = tmp_path / "cache" / "deb" / "openclipart-svg" / ".complete"
    stamp = complete.stat().st_mtime_ns
    assert main(["data", "openclipart", "--out", str(out), "--source", str(deb), "--cache", str(tmp_path / "cache"),
                 "--size", str(SIZE), "--workers", "1", "--limit", "5", "--split", "0.6,0.2,0.2"]) == 0
    assert complete.stat().st_mtime_ns == stamp  # the same .deb is not unpacked twice
    capsys.readouterr()
    rc = main(["data", "openclipart", "--out", str(out), "--source", str(tmp_path / "nowhere")])
    assert rc == 2 and "not a folder or a .deb" in capsys.readouterr().err
    rc = main(["data", "openclipart", "--out", str(tmp_path / "y"), "--source", str(clipart_tree),
               "--split", "0.5,0.5,0.5"])
    assert rc == 2 and "summing to 1" in capsys.readouterr().err


def test_cli_help_lists_designs():
    proc = subprocess.run([sys.executable, "-m", "littune", "data", "emoji", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "fluent-3d (fluent, not default)" in proc.stdout and "--limit-concepts" in proc.stdout


def test_skip_messages_split_into_reason_and_detail():
    assert reason_and_detail("duplicate: same bytes as a.svg") == ("duplicate", "same bytes as a.svg")
    assert reason_and_detail("not valid XML (no element found: line 1)") == ("not valid XML", "no element found: line 1")
    assert reason_and_detail("equals a held-out concept's caption; dropped from 2 training image(s)") == (
        "equals a held-out concept's caption", "dropped from 2 training image(s)")
    assert reason_and_detail("no title") == ("no title", "")


def test_openclipart_without_usable_drawings_reports_why(tmp_path):
    src = tmp_path / "svg" / "misc"
    src.mkdir(parents=True)
    (src / "broken.svg").write_text("<svg><metadata>")
    (src / "untitled.svg").write_text(_clip("", SHAPE.format("#f00")))
    out = tmp_path / "oc"
    with pytest.raises(LittuneError, match="no usable drawings among 2 SVG files"):
        openclipart.build_openclipart(out, source=tmp_path / "svg", size=SIZE, workers=1, log=lambda msg: None)
    assert (out / "skipped.tsv").read_text().splitlines()[0] == "where\treason\tdetail"
    rows = read_skipped(out / "skipped.tsv")
    assert [(w, r) for w, r, _ in rows] == [("misc/broken.svg", "not valid XML"), ("misc/untitled.svg", "no title")]
    assert not (out / "manifest.json").exists() and not (out / "train.csv").exists()
