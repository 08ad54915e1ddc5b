"""Hostile input: the files a careless user or an attacker puts where images should be, and damaged models.

The corpus (:func:`hostile_corpus`) holds good images of six formats next to every bad thing that
stopped, hung or blew up ``littune embed`` / ``classify`` before (issue 23, items 16-18): a FIFO named
``.jpg``, a 2 GB sparse non-image named ``.png``, a file name that is not UTF-8, a 1 x 12,000 PNG,
a truncated JPEG, an empty file, a symbolic link loop, a directory named ``x.jpg``, a text file named
``.jpg``, a PNG whose header asks for 900 M pixels. Each run must embed (or classify) every good image
once, report every bad one with its reason, add up, stay within bounded memory and never hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import colour_image, png_bytes
from littune.cli import main

ROOT = Path(__file__).resolve().parent.parent


# -- a damaged model folder -----------------------------------------------------------------------------
@pytest.fixture
def saved_model(tmp_path, tiny_model, one_thread):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    colour_image(1).save(tmp_path / "cat.png")
    return folder


def _classify(model: Path, image: Path, capsys) -> tuple[int, list[str]]:
    rc = main(["classify", "--model", str(model), "--labels", "cat,dog", str(image)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_damaged_model_safetensors_is_one_line_naming_the_file(saved_model, capsys):
    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"littune classify: error: {weights} is damaged or not a safetensors file")
    weights.write_text("<html>404 Not Found</html>")  # something else saved under the name
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1 and f"{weights} is damaged or not a safetensors file" in err[0]


def test_a_model_safetensors_of_the_wrong_shape_is_one_line_naming_the_tensor(saved_model, capsys):
    from safetensors.torch import load_file, save_file
    import torch

    weights = saved_model / "model.safetensors"
    state = load_file(str(weights))
    state["image_head.bias"] = torch.zeros(17)  # the model's is (16,): a model of another embed_dim
    save_file(state, str(weights), metadata={"format": "pt"})
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"littune classify: error: {weights} does not match its config: image_head.bias is [17] "
                      "in the file, [16] in the model")


def test_classify_shows_an_image_name_that_is_not_utf8_with_escapes(saved_model, capsys):
    """A good image under a Latin-1 name: classified, its name printed as ``caf\\xe9.png`` (printing the
    raw name to a strict UTF-8 stdout ended the run with "surrogates not allowed")."""
    folder = os.fsencode(saved_model.parent)
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as f:
        f.write((saved_model.parent / "cat.png").read_bytes())
    name = os.fsdecode(os.path.join(folder, b"caf\xe9.png"))
    assert main(["classify", "--model", str(saved_model), "--labels", "cat,dog", name, "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{saved_model.parent}/caf\\xe9.png"


def test_an_oserror_reading_a_tar_member_is_a_skip_in_classify_and_eval_not_a_traceback(tmp_path, tiny_model,
                                                                                       one_thread):
    """eval and index decode webdataset records from their shard; a shard that became a symbolic link loop
    (or a directory, or an I/O error) raised OSError out of the decoding thread."""
    from data_fixtures import encode, write_tar
    from littune.data import open_source
    from littune.data.records import Record
    from littune.inference.embeddings import image_embeddings

    tar = write_tar(tmp_path / "shard.tar", [("a.png", encode(colour_image(1), "PNG")), ("a.txt", b"a red thing")])
    recs = open_source(tar).records()
    colour_image(2).save(tmp_path / "good.png")
    tar.unlink()
    os.symlink("shard.tar", tar)  # shard.tar -> shard.tar: ELOOP
    _, kept, skipped = image_embeddings(tiny_model(), [Record("good", path=str(tmp_path / "good.png")), *recs],
                                        skip_bad=True)
    assert kept == [0] and skipped == [(f"{tar}:a", "missing: cannot read the tar shard: symbolic link loop")]


# -- the hostile corpus ---------------------------------------------------------------------------------
#: the tiny CNN at 224 px (shorter side to 256 first): a thin image would be resized to 256 x 3,072,000
TOWER_224 = {"type": "torch", "factory": "littune.towers.tiny:tiny_cnn",
             "preprocess": {"size": 224, "resize": 256, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
NOT_UTF8 = b"caf\xe9.png"  # Latin-1 bytes in a UTF-8 world
BIG = 2 * 2**30


def hostile_corpus(root: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """Build the corpus in ``root``. Returns the good images' keys (relative paths, as a folder source
    keys them) and ``{bad name: (reason, a phrase of the detail)}``."""
    root.mkdir(parents=True)
    good = []
    for i, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp"),
                                    ("GIF", "gif"), ("TIFF", "tiff")]):
        colour_image(i, (64, 48)).save(root / f"good{i}.{ext}", fmt)
        good.append(f"good{i}.{ext}")
    thin = np.full((12000, 1, 3), 200, np.uint8)
    thin[6000] = (0, 0, 255)
    Image.fromarray(thin).save(root / "thin.png")  # 1 x 12,000 px: a good image of a few hundred bytes
    good.append("thin.png")
    (root / "dir.jpg").mkdir()  # a folder named like an image: walked as a folder
    colour_image(9).save(root / "dir.jpg" / "inside.png")
    good.append("dir.jpg/inside.png")
    jpeg = (root / "good1.jpg").read_bytes()
    bad: dict[str, tuple[str, str]] = {}
    os.mkfifo(root / "fifo.jpg")
    bad["fifo.jpg"] = ("not an image", "not a regular file (a FIFO)")
    with open(root / "big.png", "wb") as f:
        f.truncate(BIG)  # sparse: no disk
    bad["big.png"] = ("not an image", "no image signature")
    (root / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["cut.jpg"] = ("truncated", "")
    (root / "cut_header.jpg").write_bytes(jpeg[:120])  # Pillow: "Truncated File Read", was 'corrupt'
    bad["cut_header.jpg"] = ("truncated", "")
    (root / "empty.png").write_bytes(b"")
    bad["empty.png"] = ("empty file", "0 bytes")
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    bad["loop_a.jpg"] = bad["loop_b.jpg"] = ("missing", "symbolic link loop")
    (root / "text.jpg").write_text("this is not a picture\n")
    bad["text.jpg"] = ("not an image", "cannot identify")
    (root / "bomb.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(30000, 30000)))
    bad["bomb.png"] = ("too many pixels", "900000000 pixels")
    with open(os.path.join(os.fsencode(root), NOT_UTF8), "wb") as f:
        f.write((root / "good0.png").read_bytes())
    return sorted(good), bad


PEAK = """
import resource, sys
from littune.cli import main
rc = main(sys.argv[1:])
peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print("peak-rss-kb", peak, file=sys.stderr)
sys.exit(rc)
"""


def _littune(args: list, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``littune ARGS`` in a fresh process (a FIFO or a blown intermediate cannot take pytest with it)
    under a strict UTF-8 stdout; returns the process and its peak RSS (itself or a worker) in MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONIOENCODING": "utf-8:strict"}
    try:
        run = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"littune {args[0]} did not finish in {timeout} s on the hostile corpus (a FIFO read?)")
    err = run.stderr.decode("utf-8", "backslashreplace")
    peak = [ln for ln in err.splitlines() if ln.startswith("peak-rss-kb")]
    assert peak, err[-3000:]
    return run, int(peak[-1].split()[1]) / 1024


def test_embed_of_the_hostile_corpus_embeds_every_good_image_once_and_reports_every_bad_one(tmp_path):
    import json

    from littune.cache import EmbeddingCache
    from littune.fileio import read_skipped

    root, out = tmp_path / "corpus", tmp_path / "cache"
    good, bad = hostile_corpus(root)
    run, peak = _littune(["embed", str(root), "--out", str(out), "--tower", json.dumps(TOWER_224), "--runtime",
                          "torch", "--workers", "1", "-q"], timeout=90)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, stderr[-3000:]
    cache = EmbeddingCache.open(out)
    assert [cache.key(i) for i in range(len(cache))] == good  # each good image once, in order
    skipped = {Path(w).name if "\\x" not in w else w: (r, d) for w, r, d in read_skipped(out / "skipped.tsv")
               if r != "no-caption"}
    shown = f"{root}/caf\\xe9.png"
    assert skipped.pop(shown)[0] == "index"
    assert set(skipped) == set(bad)
    for name, (reason, phrase) in bad.items():
        assert skipped[name][0] == reason and phrase in skipped[name][1], (name, skipped[name])
    m = cache.manifest
    assert m["records"] == len(good) + len(bad) and m["count"] + m["skipped"] == m["records"]
    assert m["index_problems"] == 1 and m["skipped"] == len(bad)
    assert f"embedded {len(good)} images" in stdout and f"skipped {len(bad) + 1}:" in stdout
    assert f"left out 1 file whose name is not UTF-8: {shown}" in stderr
    # a 2 GB file, a thin image resized to 256 x 3,072,000: the run stays small
    assert peak < 1536, f"embed of the hostile corpus peaked at {peak:.0f} MiB"


def test_classify_of_the_hostile_corpus_classifies_the_good_ones_and_names_each_bad_one(tmp_path, one_thread):
    import json

    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel

    root = tmp_path / "corpus"
    good, bad = hostile_corpus(root)
    model = tmp_path / "model"
    config = LiTConfig(setting="Lu", image_tower=TOWER_224, text_tower=dict(TINY_TEXT), embed_dim=16)
    LiTModel.from_config(config, captions=CAPTIONS).save_pretrained(model)
    images = [os.path.join(os.fsencode(root), os.fsencode(n)) for n in [*good, *sorted(bad), "dir.jpg"]]
    images.append(os.path.join(os.fsencode(root), NOT_UTF8))  # a good image under a bad name: classified
    run, peak = _littune(["classify", "--model", str(model), "--labels", "red,green,blue", "--json", *images],
                         timeout=90)
    stderr = run.stderr.decode("utf-8", "backslashreplace").splitlines()
    assert run.returncode == 1, stderr[-20:]  # some images could not be read
    results = json.loads(run.stdout)
    assert [r["image"] for r in results] == [f"{root}/{n}" for n in good] + [f"{root}/caf\\xe9.png"]
    assert all(abs(sum(x["probability"] for x in r["labels"]) - 1) < 1e-5 for r in results)
    cannot = {ln.split(": ", 2)[1].removeprefix("cannot read ").rsplit("/", 1)[-1]: ln.split(": ", 2)[2]
              for ln in stderr if ln.startswith("littune classify: cannot read")}
    assert set(cannot) == set(bad) | {"dir.jpg"}
    for name, (reason, phrase) in bad.items():
        assert cannot[name].startswith(reason) and phrase in cannot[name], (name, cannot[name])
    assert cannot["dir.jpg"] == "not an image: is a directory"
    assert peak < 1536, f"classify of the hostile corpus peaked at {peak:.0f} MiB"
