"""Every evaluation/inference subcommand on a tiny trained model, and their one-line errors.

The fixture trains a tiny Lu model for 150 contrastive steps on coloured squares and stripes
("a red square", "stripe in red"), saves it with save_pretrained, and the tests drive
`littune eval zeroshot`, `eval retrieval`, `classify`, `index` and `search` through `littune.cli.main`
(and `python -m littune` once). Zero-shot colour classification must come out well above chance.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from littune.cli import main

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 40, 170), "orange": (250, 140, 20)}
SHAPES = ("square", "stripe")


def _image(rgb, shape, rng) -> Image.Image:
    arr = np.full((40, 40, 3), 128, np.uint8)
    colour = np.clip(np.array(rgb) + rng.integers(-20, 20, size=3), 0, 255)
    if shape == "square":
        arr[8:32, 8:32] = colour
    else:
        arr[:, 14:26] = colour
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data (class folder, label CSV, caption CSV, templates) and a tiny trained model directory."""
    from littune import LiTConfig, LiTModel
    from littune.train.losses import ContrastiveLoss
    from littune.towers.tiny import SPEC

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli_eval")
    rng = np.random.default_rng(0)
    items, pairs, labels = [], ["image,caption"], ["image,label"]
    for name, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(2):
                rel = f"zs/{name}/{shape}_{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                _image(rgb, shape, rng).save(root / rel)
                caps = [f"a {name} {shape}", f"{shape} in {name}"]
                items.append((root / rel, caps))
                pairs += [f"{rel},{c}" for c in caps]
                labels.append(f"{rel},{name}")
    (root / "pairs.csv").write_text("\n".join(pairs) + "\n")
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    (root / "templates.txt").write_text("# colour prompts\na {} square\na {} stripe\n")

    cfg = LiTConfig(setting="Lu", image_tower=SPEC, embed_dim=16,
                    text_tower={"type": "transformer", "width": 32, "depth": 1, "heads": 2,
                                "context_length": 12, "vocab_size": 200})
    torch.manual_seed(0)
    model = LiTModel.from_config(cfg, captions=[c for _, cs in items for c in cs])
    pixels = torch.stack([model.preprocess.eval(Image.open(p).convert("RGB")) for p, _ in items])
    feats = model.image_features(pixels)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn, r = ContrastiveLoss(), random.Random(0)
    model.train()
    for _ in range(150):
        idx = r.sample(range(len(items)), 16)
        img, txt = model(**model.tokenize([r.choice(items[i][1]) for i in idx]), image_features=feats[idx])
        loss = loss_fn(img, txt, model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(root / "model")
    yield root
    torch.set_num_threads(threads)


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error(capsys, command, *argv):
    rc, out, err = _run(capsys, command, *argv)
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"littune {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_eval_zeroshot_well_above_chance(world, capsys, tmp_path):
    rc, out, err = _run(capsys, "eval", "zeroshot", world / "zs", "--model", world / "model", "-q",
                        "--templates", world / "templates.txt", "--per-class", "--confusion", tmp_path / "cm.png",
                        "--out", tmp_path / "zs.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "zs.json").read_text())
    assert res["task"] == "zeroshot_classification"
    m = res["metrics"]
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"}
    assert m["acc1"] >= 0.6  # 8 classes: chance is 0.125
    assert m["acc5"] >= m["acc1"]
    assert res["littune"]["n_images"] == 32 and res["littune"]["n_templates"] == 2
    assert len(res["littune"]["per_class"]) == 8 and res["littune"]["per_class"][0]["class"] == "black"
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "acc1" in out and "most confused with" in out and "purple" in out
    # The same images through a label CSV give the same numbers.
    rc, out, err = _run(capsys, "eval", "zeroshot", world / "labels.csv", "--model", world / "model", "-q",
                        "--templates", world / "templates.txt", "--out", tmp_path / "csv.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "csv.json").read_text())["metrics"] == pytest.approx(m)


def test_eval_zeroshot_from_cache(world, capsys, tmp_path):
    cache_mod = pytest.importorskip("littune.cache")
    from littune import LiTModel
    from littune.data.sources import open_source

    model = LiTModel.from_pretrained(world / "model")
    cache_mod.embed_source(open_source(str(world / "zs")), model.image_tower, tmp_path / "cache", progress=False,
                           workers=0)
    args = ["eval", "zeroshot", world / "zs", "--model", world / "model", "-q", "--templates", world / "templates.txt"]
    _run(capsys, *args, "--out", tmp_path / "a.json")
    rc, out, err = _run(capsys, *args, "--cache", tmp_path / "cache", "--out", tmp_path / "b.json")
    assert rc == 0, err
    a = json.loads((tmp_path / "a.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert b == pytest.approx(a, abs=1 / 32 + 1e-9)  # float16 features may flip at most a near tie


def test_eval_retrieval(world, capsys, tmp_path):
    rc, out, err = _run(capsys, "eval", "retrieval", world / "pairs.csv", "--model", world / "model", "-q",
                        "--out", tmp_path / "ret.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "ret.json").read_text())
    assert res["task"] == "zeroshot_retrieval"
    m = res["metrics"]
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert all(0 <= v <= 1 for v in m.values())
    assert m["text_retrieval_recall@10"] >= m["text_retrieval_recall@1"]
    # 32 images, 64 captions: each caption's image shares colour+shape with one other image, so
    # a learned model finds the colour's 4 images within its top 10 far more often than chance (10/32).
    assert m["image_retrieval_recall@10"] >= 0.6
    assert res["littune"]["n_images"] == 32 and res["littune"]["n_texts"] == 64
    assert "64 captions" in out


def test_classify_prints_ranked_tables(world, capsys):
    red = world / "zs" / "red" / "square_0.png"
    blue = world / "zs" / "blue" / "stripe_1.png"
    rc, out, err = _run(capsys, "classify", "--model", world / "model", red, blue, "--labels", "red, green,blue",
                        "--templates", world / "templates.txt")
    assert rc == 0, err
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2 and blocks[0].splitlines()[0] == str(red)
    rows = blocks[0].splitlines()[1:]
    assert len(rows) == 3 and rows[0].split()[0] == "1."
    probs = [float(r.split()[2]) for r in rows]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 2e-3
    rc, out, err = _run(capsys, "classify", "--model", world / "model", red, blue, "--labels", "red,green,blue",
                        "--templates", world / "templates.txt", "--json", "--top", "0")
    res = json.loads(out)
    assert res[0]["labels"][0]["label"] == "red" and res[1]["labels"][0]["label"] == "blue"
    assert sum(x["probability"] for x in res[0]["labels"]) == pytest.approx(1, abs=1e-5)


def test_classify_reports_a_bad_image_and_classifies_the_rest(world, capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rc, out, err = _run(capsys, "classify", "--model", world / "model", bad, world / "zs" / "red" / "square_0.png",
                        "--labels", "red,blue")
    assert rc == 1
    assert "bad.png" in err and "square_0.png" in out


def test_index_and_search(world, capsys, tmp_path):
    rc, out, err = _run(capsys, "index", world / "zs", "--model", world / "model", "--out", tmp_path / "idx", "-q",
                        "--workers", "0")
    assert rc == 0, err
    assert "indexed 32 images (16-d float16)" in out
    rc, out, err = _run(capsys, "search", "--index", tmp_path / "idx", "a red square", "-k", "4", "--json")
    assert rc == 0, err
    res = json.loads(out)
    hits = res[0]["hits"]
    assert res[0]["query"] == "a red square" and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert "/red/" in hits[0]["path"]
    query = world / "zs" / "green" / "stripe_0.png"
    rc, out, err = _run(capsys, "search", "--index", tmp_path / "idx", "--image", query, "-k", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"image: {query}"
    rank, score, path = lines[1].split(maxsplit=2)
    assert rank == "1" and path == str(query) and float(score) == pytest.approx(1, abs=2e-3)
    # an index with a copied model directory elsewhere: --model overrides the recorded one
    rc, out, err = _run(capsys, "search", "--index", tmp_path / "idx", "--model", world / "model", "a blue stripe")
    assert rc == 0 and out.startswith("text: a blue stripe")


def test_index_from_an_image_list_csv(world, capsys, tmp_path):
    files = sorted((world / "zs").rglob("*.png"))[:5]
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(str(p) for p in files))
    rc, out, err = _run(capsys, "index", tmp_path / "list.csv", "--model", world / "model", "--out", tmp_path / "i",
                        "-q", "--workers", "0")
    assert rc == 0, err
    assert "indexed 5 images" in out


def test_errors_are_one_line(world, capsys, tmp_path):
    model = world / "model"
    img = world / "zs" / "red" / "square_0.png"
    assert "no config.json" in _error(capsys, "classify", "--model", tmp_path, img, "--labels", "a,b")
    assert "label list is empty" in _error(capsys, "classify", "--model", model, img, "--labels", " , ")
    assert "given twice" in _error(capsys, "classify", "--model", model, img, "--labels", "a,b,a")
    assert "unknown template set 'fancy'" in _error(capsys, "classify", "--model", model, img, "--labels", "a",
                                                    "--templates", "fancy")
    assert "unknown template set" in _error(capsys, "eval", "zeroshot", world / "zs", "--model", model,
                                            "--templates", "nope")
    assert "dataset not found" in _error(capsys, "eval", "zeroshot", tmp_path / "missing", "--model", model)
    assert "source not found" in _error(capsys, "eval", "retrieval", tmp_path / "missing.csv", "--model", model)
    assert "no config.json" in _error(capsys, "eval", "retrieval", world / "pairs.csv", "--model", tmp_path)
    assert "--ks" in _error(capsys, "eval", "retrieval", world / "pairs.csv", "--model", model, "--ks", "a,b")
    assert "index not found" in _error(capsys, "search", "--index", tmp_path / "nope", "cat")
    assert "nothing to search for" in _error(capsys, "search", "--index", tmp_path / "nope")
    assert "source not found" in _error(capsys, "index", tmp_path / "nope", "--model", model, "--out", tmp_path / "i")
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert "faiss-cpu" in _error(capsys, "index", world / "zs", "--model", model, "--out", tmp_path / "i",
                                     "--faiss", "Flat")


@pytest.mark.parametrize("argv,example", [
    (["eval"], "littune eval zeroshot"),
    (["eval", "zeroshot"], "--per-class --confusion"),
    (["eval", "retrieval"], "littune eval retrieval"),
    (["classify"], "littune classify --model"),
    (["index"], "littune index photos/"),
    (["search"], 'littune search --index photos.index "a red bicycle"'),
])
def test_help_has_an_example(capsys, argv, example):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and example in out


def test_module_entry_point(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "littune", "classify", "--model", str(world / "model"),
           str(world / "zs" / "red" / "square_0.png"), "--labels", "red,blue", "--templates", "none"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith("square_0.png") and len(done.stdout.splitlines()) == 3
    done = subprocess.run(cmd[:-4] + ["--labels", ""], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ('littune classify: error: the label list is empty: give --labels "cat,dog,horse" '
                                   "or --labels-file FILE")


def _same_names_other_images(world, out):
    """A copy of the class folder and the caption CSV with the same file names holding other images
    (colours rotated)."""
    names = list(COLOURS)
    rng = np.random.default_rng(1)
    for path in sorted((world / "zs").rglob("*.png")):
        rel = path.relative_to(world)
        other = names[(names.index(rel.parts[1]) + 3) % len(names)]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(COLOURS[other], "stripe" if "square" in rel.name else "square", rng).save(out / rel)
    (out / "pairs.csv").write_text((world / "pairs.csv").read_text())
    return out / "zs"


def test_eval_and_index_refuse_a_cache_of_other_images_with_the_same_names(world, capsys, tmp_path):
    """A cache keyed by file name, built from other images: its features are not these images'. eval
    --cache and index --cache compare the source fingerprints (one line naming both); --allow-stale-cache
    insists, with a warning."""
    from littune.data.sources import open_source

    other = _same_names_other_images(world, tmp_path / "other")  # other/zs, other/pairs.csv
    args = ["--model", world / "model", "-q", "--templates", world / "templates.txt"]
    rc, out, err = _run(capsys, "index", world / "zs", "--model", world / "model", "--out", tmp_path / "i1",
                        "--cache", tmp_path / "cache", "-q", "--workers", "0")
    assert rc == 0, err
    ours, theirs = open_source(str(world / "zs")).fingerprint(), open_source(str(other)).fingerprint()
    assert ours != theirs
    _run(capsys, "eval", "zeroshot", world / "zs", *args, "--cache", tmp_path / "cache", "--out", tmp_path / "a.json")
    line = _error(capsys, "eval", "zeroshot", other, *args, "--cache", tmp_path / "cache")
    assert "stale" in line and ours in line and theirs in line and "--allow-stale-cache" in line
    rc, out, err = _run(capsys, "index", world / "pairs.csv", "--model", world / "model", "--out", tmp_path / "i0",
                        "--cache", tmp_path / "pairs_cache", "-q", "--workers", "0")
    assert rc == 0, err
    line = _error(capsys, "eval", "retrieval", other.parent / "pairs.csv", "--model", world / "model", "-q",
                  "--cache", tmp_path / "pairs_cache")
    assert "source fingerprint" in line and "--allow-stale-cache" in line
    line = _error(capsys, "index", other, "--model", world / "model", "--out", tmp_path / "i2",
                  "--cache", tmp_path / "cache", "-q", "--workers", "0")
    assert "stale" in line and ours in line and theirs in line and "--allow-stale-cache" in line
    # insisting: the cached features, by name, with a warning
    rc, out, err = _run(capsys, "eval", "zeroshot", other, *args, "--cache", tmp_path / "cache",
                        "--allow-stale-cache", "--out", tmp_path / "b.json")
    assert rc == 0 and "warning" in err and theirs in err, err
    a, b = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "b.json"))
    assert a == b  # the old images' features, as asked
    rc, out, err = _run(capsys, "index", other, "--model", world / "model", "--out", tmp_path / "i2",
                        "--cache", tmp_path / "cache", "--allow-stale-cache", "-q", "--workers", "0")
    assert rc == 0 and "indexed 32 images" in out and "warning" in err, err
    # and the cache of the other folder is accepted for it
    rc, out, err = _run(capsys, "index", other, "--model", world / "model", "--out", tmp_path / "i3",
                        "--cache", tmp_path / "cache2", "-q", "--workers", "0")
    assert rc == 0, err
    rc, out, err = _run(capsys, "eval", "zeroshot", other, *args, "--cache", tmp_path / "cache2")
    assert rc == 0 and "warning" not in err, err
