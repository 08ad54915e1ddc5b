"""The pointing game (littune.eval.pointing): collages of held-out emoji designs built by the offline builder
from the fake icon sets of test_builders, a real tiny model, `littune eval pointing` end to end; the
collage geometry and the scoring on maps whose answer is known."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("resvg")

from conftest import CAPTIONS, TINY_TEXT  # noqa: E402
from littune.cli import main  # noqa: E402
from littune.errors import LittuneError  # noqa: E402
from littune.eval.pointing import cell_centres, layout, render, score, summarize  # noqa: E402
from test_builders import DESIGNS, _fake_npm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """The fake emoji dataset's held-out designs (twemoji, openmoji), rendered at 64 px."""
    from littune.builders import emoji

    root = tmp_path_factory.mktemp("pointing")
    out = root / "emoji"
    emoji.build_emoji(out, designs=DESIGNS, packages=_fake_npm(root / "npm"), size=64, workers=1,
                      cache=root / "dl", log=lambda m: None)
    return out / "eval" / "heldout_designs"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
    return LiTModel.from_config(cfg, captions=CAPTIONS).save_pretrained(tmp_path_factory.mktemp("pm") / "model")


def test_pointing_game_end_to_end_on_fake_emoji(heldout, model_dir, tmp_path, capsys):
    from littune.eval.sets import class_folder

    args = ["eval", "pointing", str(heldout), "--model", str(model_dir), "--collages", "7", "--canvas", "96",
            "--batch-size", "3", "-q"]
    assert main(args + ["--out", str(tmp_path / "p.json"), "--figure", str(tmp_path / "p.png")]) == 0
    assert "pointing_accuracy" in capsys.readouterr().out
    res = json.loads((tmp_path / "p.json").read_text())
    m, trials = res["metrics"], res["littune"]["trials"]
    names = set(class_folder(heldout).classnames)
    assert m["collages"] == 7 and m["trials"] == len(trials) and 14 <= len(trials) <= 28
    assert m["map_shape"] == [4, 4] and m["exact"] is True  # the tiny tower at 32 px: a 4 x 4 map
    assert {t["collage"] for t in trials} == set(range(7)) and {t["name"] for t in trials} <= names
    for c in range(7):
        here = [t for t in trials if t["collage"] == c]
        assert 2 <= len(here) <= 4 and len({t["name"] for t in here}) == len(here)
    # every number recomputed from the trials: 96-px canvas, the tiny tower sees all of it (resize = size)
    centres = cell_centres((0, 0, 96, 96), (4, 4))
    for t in trials:
        x0, y0, x1, y1 = t["box"]
        assert t["centre_hit"] == (x0 <= 48 <= x1 and y0 <= 48 <= y1)
        assert t["random_hit"] == pytest.approx(np.mean([x0 <= x <= x1 and y0 <= y <= y1 for x, y in centres]))
        assert t["hit"] == (x0 <= t["point"][0] <= x1 and y0 <= t["point"][1] <= y1)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
    assert m["pointing_accuracy"] == pytest.approx(np.mean([t["hit"] for t in trials]))
    assert m["centre_baseline"] == pytest.approx(np.mean([t["centre_hit"] for t in trials]))
    assert m["reachable"] == pytest.approx(np.mean([t["random_hit"] > 0 for t in trials]))
    assert sum(v["trials"] for v in m["by_count"].values()) == len(trials)
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.height > 300  # four collages, a row each
    # the same seed draws the same collages; another seed others
    assert main(args + ["--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["littune"]["trials"] == trials
    assert main(args + ["--seed", "1", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["littune"]["trials"] != trials


def test_collages_paste_each_image_inside_the_seen_area_in_its_box(heldout):
    from littune.eval.sets import class_folder

    data = class_folder(heldout)
    rng = random.Random(3)
    area = (20, 20, 236, 236)  # what a 224-of-256 centre crop keeps of a 256 canvas
    for _ in range(20):
        lay = layout(rng, data.labels, area, rng.randint(2, 4))
        assert len({data.labels[i] for i in lay.items}) == len(lay.items)  # distinct classes
        img, boxes = render(lay, data.records, 256)
        ink = (255 - np.asarray(img, dtype=np.int16)).max(axis=2) > 24
        covered = np.zeros_like(ink)
        for (x, y, s), (x0, y0, x1, y1) in zip(lay.squares, boxes):
            assert area[0] <= x and x + s <= area[2] and area[1] <= y and y + s <= area[3]
            assert x <= x0 < x1 <= x + s and y <= y0 < y1 <= y + s
            assert ink[y0:y1, x0:x1].any() and not covered[y:y + s, x:x + s].any()  # drawn; no overlap
            covered[y:y + s, x:x + s] = True
        assert not ink[~covered].any()  # nothing drawn outside the pasted squares


def test_scoring_a_map_that_peaks_in_its_box_and_one_that_does_not():
    crop, boxes = (0, 0, 80, 80), [(0, 0, 40, 40), (40, 40, 80, 80)]
    maps = np.zeros((2, 4, 4), np.float32)
    maps[0, 1, 0] = 1.0  # "a" peaks in its top-left box (cell centre 10, 30)
    maps[1, 0, 3] = 1.0  # "b" peaks top-right, outside its bottom-right box
    a, b = score(maps, ["a", "b"], boxes, crop, 80, logit_scale=10.0)
    assert (a["hit"], b["hit"]) == (True, False) and a["point"] == [10.0, 30.0]
    assert a["centre_hit"] and b["centre_hit"]  # (40, 40) lies on both boxes' corners
    assert a["random_hit"] == b["random_hit"] == 0.25  # 4 of the 16 cell centres
    s = summarize([a, b])
    assert s["pointing_accuracy"] == 0.5 and s["centre_baseline"] == 1.0 and s["trials"] == 2 and s["reachable"] == 1


def test_too_few_classes_and_an_unreadable_image_are_one_line(heldout, model_dir, tmp_path):
    import shutil

    from littune import LiTModel
    from littune.eval.pointing import play
    from littune.eval.sets import class_folder

    small = tmp_path / "small"
    for d in sorted(p for p in heldout.iterdir() if p.is_dir())[:3]:
        shutil.copytree(d, small / d.name)
    model = LiTModel.from_pretrained(model_dir)
    with pytest.raises(LittuneError, match="has 3 classes: a collage of 4 images needs as many"):
        play(model, class_folder(small), collages=2)
    four = next(p for p in sorted(heldout.iterdir()) if p.is_dir() and p.name not in {d.name for d in small.iterdir()})
    shutil.copytree(four, small / four.name)
    for png in (small / four.name).iterdir():
        png.write_bytes(png.read_bytes()[:40])  # cut short
    with pytest.raises(LittuneError, match=rf"cannot read image .*{four.name}.*: truncated"):
        play(model, class_folder(small), collages=1, counts=(4, 4))
