"""One embedding per image: a row of a cache is reused by every source that names the same file.

A second caption file over the same images, `littune index` and `littune eval` run the locked tower only on
what no cache holds (counted at the runner that runs the tower, whatever the runtime); the caches they write
are the bytes a run without reuse writes; a file that changed, another tower, pre-processing, runtime, seed
or key reuses nothing; a reusing run killed with SIGKILL resumes to the bytes of an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import colour_image, tiny_tower_arg, write_images
from littune.cache import EmbeddingCache, embed_source
from littune.cli import main
from littune.data import open_source
from littune.towers.tiny import SPEC

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600


def _tree(d: Path) -> dict[str, bytes]:
    # .lock names whoever last held the directory (pid, host, time): not the cache's content
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _age(paths, seconds: float = HOUR) -> None:
    """Files written long ago, as a dataset is (a file modified within 2 s is never reused: its mtime could
    stay the same through another change)."""
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _images(root: Path, n: int, start: int = 0, ext: str = "png", size=(48, 36), sub: str = "img") -> list[str]:
    """``n`` images in ``root/sub``, written an hour ago; their paths relative to ``root``."""
    names = write_images(root / sub, n, start=start, ext=ext, size=size)
    _age(root / sub / nm for nm in names)
    return [f"{sub}/{nm}" for nm in names]


def _csv(path: Path, names: list[str], caption: str, lang: str | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("image,caption" + (",lang\n" if lang else "\n"))
        for nm in names:
            f.write(f"{nm},{caption} {nm}" + (f",{lang}\n" if lang else "\n"))
    return path


@pytest.fixture
def computed(monkeypatch):
    """How many pixel rows the locked tower ran on since the last ``take()``: every runner that computes image
    features (embed, index, eval; torch or onnxruntime) is wrapped by one that counts its batches."""
    import littune.cache.forward as forward_module
    import littune.towers.runtime as runtime_module

    seen: list[int] = []
    real = runtime_module.open_runner

    class Counted:
        def __init__(self, runner):
            self.runner, self.name = runner, runner.name

        def __call__(self, pixels):
            seen.append(int(pixels.shape[0]))
            return self.runner(pixels)

        def close(self):
            self.runner.close()

    def counting(*args, **kwargs):
        return Counted(real(*args, **kwargs))

    monkeypatch.setattr(runtime_module, "open_runner", counting)
    monkeypatch.setattr(forward_module, "open_runner", counting)

    class Count:
        def take(self) -> int:
            n = sum(seen)
            seen.clear()
            return n

    return Count()


def _embed(capsys, source, out, *extra) -> list[str]:
    assert main(["embed", str(source), "--out", str(out), "--tower", tiny_tower_arg(), "--workers", "0", "-q",
                 *map(str, extra)]) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_a_second_caption_file_embeds_no_image_and_writes_what_a_fresh_embed_writes(tmp_path, capsys, computed):
    names = _images(tmp_path, 24)
    en = _csv(tmp_path / "en.csv", names, "a drawing of")
    ml = _csv(tmp_path / "ml.csv", names[::-1], "eine Zeichnung von", lang="de")  # another order, other captions
    assert _embed(capsys, en, tmp_path / "en", "--shard-size", 5) == [
        f"embedded 24 images (32-d float16) into {tmp_path / 'en'}; nothing skipped"]
    assert computed.take() == 24
    lines = _embed(capsys, ml, tmp_path / "ml", "--shard-size", 7)
    assert computed.take() == 0
    assert lines == [f"embedded 24 images (32-d float16) into {tmp_path / 'ml'}; nothing skipped",
                     f"embedded 0 new images, reused 24 from {tmp_path / 'en'}"]
    assert _embed(capsys, ml, tmp_path / "fresh", "--shard-size", 7, "--no-reuse") == [
        f"embedded 24 images (32-d float16) into {tmp_path / 'fresh'}; nothing skipped"]
    assert computed.take() == 24
    # the reusing cache is the fresh one, byte for byte, and complete on its own
    assert _tree(tmp_path / "ml") == _tree(tmp_path / "fresh")
    shutil.rmtree(tmp_path / "en")
    moved = shutil.move(str(tmp_path / "ml"), str(tmp_path / "moved"))
    cache = EmbeddingCache.open(moved)
    assert cache.captions(0) == [f"eine Zeichnung von {names[-1]}"] and cache.caption_languages(0) == ["de"]


def test_index_after_embed_runs_the_tower_on_nothing_and_on_ten_added_images_ten_times(tmp_path, capsys, computed,
                                                                                       tiny_model):
    from littune.search import SearchIndex

    tiny_model().save_pretrained(tmp_path / "model")
    names = _images(tmp_path, 15, sub="img/apple") + _images(tmp_path, 15, start=15, sub="img/pear")
    _embed(capsys, _csv(tmp_path / "en.csv", names, "a drawing of"), tmp_path / "cache")
    assert computed.take() == 30
    index = ["index", str(tmp_path / "img"), "--model", str(tmp_path / "model"), "--workers", "0", "-q"]
    assert main([*index, "--out", str(tmp_path / "idx")]) == 0
    assert computed.take() == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"embedded 0 new images, reused 30 from {tmp_path / 'cache'}"
    assert main([*index, "--out", str(tmp_path / "plain"), "--no-reuse"]) == 0
    assert computed.take() == 30
    assert np.array_equal(SearchIndex.open(tmp_path / "idx").embeddings,
                          SearchIndex.open(tmp_path / "plain").embeddings)
    # 10 new images in the folder: the index made again embeds those 10
    _images(tmp_path, 5, start=30, sub="img/apple")
    _images(tmp_path, 5, start=35, sub="img/pear")
    assert main([*index, "--out", str(tmp_path / "idx"), "--overwrite"]) == 0
    assert computed.take() == 10
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("embedded 10 new images, reused 30 from ")
    assert not (tmp_path / "idx" / "features" / "shards-previous").exists()
    assert len(SearchIndex.open(tmp_path / "idx")) == 40


def test_eval_runs_the_tower_only_on_images_no_cache_holds(tmp_path, capsys, computed, tiny_model):
    from littune.inference.embeddings import image_embeddings
    from littune.eval.sets import open_labeled

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    names = _images(tmp_path, 10, sub="img/apple") + _images(tmp_path, 10, start=10, sub="img/pear")
    _embed(capsys, _csv(tmp_path / "en.csv", names, "a drawing of"), tmp_path / "cache")
    assert computed.take() == 20
    colour_image(99).save(tmp_path / "img" / "pear" / "new.png")  # one image no cache holds
    _age([tmp_path / "img" / "pear" / "new.png"])
    records = open_labeled(str(tmp_path / "img")).records
    assert len(records) == 21
    emb, kept, _ = image_embeddings(model, records, reuse=True)
    assert computed.take() == 1 and kept == list(range(21))
    assert "image features: embedded 1 new image, reused 20 from " in capsys.readouterr().err
    plain, _, _ = image_embeddings(model, records)
    assert computed.take() == 21
    assert float((emb - plain).abs().max()) < 2e-3  # the cached features are float16
    assert main(["eval", "zeroshot", str(tmp_path / "img"), "--model", str(tmp_path / "model"), "-q"]) == 0
    assert computed.take() == 1
    assert f"image features: embedded 1 new image, reused 20 from {tmp_path / 'cache'}" in capsys.readouterr().err
    assert main(["eval", "zeroshot", str(tmp_path / "img"), "--model", str(tmp_path / "model"), "-q",
                 "--no-reuse"]) == 0
    assert computed.take() == 21


def test_adding_ten_images_embeds_ten_in_the_same_cache_or_a_new_one(tmp_path, capsys, computed):
    names = _images(tmp_path, 30)
    _embed(capsys, _csv(tmp_path / "pairs.csv", names, "a drawing of"), tmp_path / "c", "--shard-size", 8)
    assert computed.take() == 30
    more = names[:15] + _images(tmp_path, 10, start=30) + names[15:]  # the new ones in the middle
    _csv(tmp_path / "pairs.csv", more, "a drawing of")
    assert main(["embed", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "c"), "--tower", tiny_tower_arg(),
                 "--shard-size", "8", "-q"]) == 2
    assert "pass --no-resume to overwrite it (the images it holds are copied" in capsys.readouterr().err
    lines = _embed(capsys, tmp_path / "pairs.csv", tmp_path / "c", "--shard-size", 8, "--no-resume")
    assert computed.take() == 10
    assert lines[-1] == f"embedded 10 new images, reused 30 from {tmp_path / 'c'}"
    assert not (tmp_path / "c" / "shards-previous").exists()
    _embed(capsys, tmp_path / "pairs.csv", tmp_path / "fresh", "--shard-size", 8, "--no-reuse")
    assert computed.take() == 40
    assert _tree(tmp_path / "c") == _tree(tmp_path / "fresh")
    assert _embed(capsys, tmp_path / "pairs.csv", tmp_path / "again", "--shard-size", 8)[-1].startswith(
        "embedded 0 new images, reused 40 from ")
    assert computed.take() == 0


def test_a_touched_rewritten_or_replaced_file_is_embedded_again(tmp_path, computed):
    names = _images(tmp_path, 12)
    src = open_source(str(_csv(tmp_path / "pairs.csv", names, "a drawing of")))
    first = embed_source(src, SPEC, tmp_path / "a", workers=0, progress=False)
    assert computed.take() == 12
    img = tmp_path / "img"
    _age([img / "im0000.png"], HOUR / 2)  # touched: another mtime
    colour_image(77).save(img / "im0001.png")  # rewritten in place, another mtime
    _age([img / "im0001.png"])
    shutil.copy2(img / "im0002.png", tmp_path / "copy.png")  # replaced: same bytes, size and mtime, a new inode
    os.replace(tmp_path / "copy.png", img / "im0002.png")
    os.utime(img / "im0003.png")  # modified just now: its mtime could still change without moving
    again = embed_source(open_source(str(tmp_path / "pairs.csv")), SPEC, tmp_path / "b", workers=0, progress=False)
    assert computed.take() == 4
    assert (again.reuse.embedded, again.reuse.reused) == (4, 8)
    assert not np.array_equal(again.features([1]), first.features([1]))
    fresh = embed_source(open_source(str(tmp_path / "pairs.csv")), SPEC, tmp_path / "fresh", workers=0,
                         progress=False, reuse=False)
    assert np.array_equal(again.features(np.arange(12)), fresh.features(np.arange(12)))


def test_another_tower_preprocessing_runtime_dtype_or_pixel_limit_reuses_nothing(tmp_path, computed):
    src = str(_csv(tmp_path / "pairs.csv", _images(tmp_path, 8), "a drawing of"))
    embed_source(src, SPEC, tmp_path / "base", workers=0, progress=False)
    assert computed.take() == 8
    others = {"tower": ({**SPEC, "kwargs": {"seed": 1}}, {}),
              "preprocessing": ({**SPEC, "preprocess": {**SPEC["preprocess"], "resize": 40}}, {}),
              "interpolation": ({**SPEC, "preprocess": {**SPEC["preprocess"], "interpolation": "bilinear"}}, {}),
              "runtime": (SPEC, {"runtime": "torch"}),
              "dtype": (SPEC, {"dtype": "float32"}),
              "pixel limit": (SPEC, {"max_pixels": 10_000})}
    for what, (spec, options) in others.items():
        cache = embed_source(src, spec, tmp_path / what, workers=0, progress=False, **options)
        assert computed.take() == 8, what
        assert (cache.reuse.embedded, cache.reuse.reused) == (8, 0), what
    # a float32 row is the float16 row's exact source: a float16 cache takes it (the bytes a fresh run writes)
    shutil.rmtree(tmp_path / "base")
    half = embed_source(src, SPEC, tmp_path / "half", workers=0, progress=False)
    assert computed.take() == 0 and half.reuse.sources == {str(tmp_path / "dtype"): 8}
    embed_source(src, SPEC, tmp_path / "fresh", workers=0, progress=False, reuse=False)
    assert _tree(tmp_path / "half") == _tree(tmp_path / "fresh")


def test_augmented_views_are_reused_only_from_the_same_seed_and_image_key(tmp_path, computed):
    names = _images(tmp_path, 6)
    src = str(_csv(tmp_path / "pairs.csv", names, "a drawing of"))
    embed_source(src, SPEC, tmp_path / "v2", views=2, workers=0, progress=False)
    assert computed.take() == 6 * 3
    embed_source(src, SPEC, tmp_path / "seed1", views=2, seed=1, workers=0, progress=False)
    assert computed.take() == 6 * 3  # another seed: other crops
    # the same files under other keys (a folder source names them im0000.png, not img/im0000.png): other crops
    (tmp_path / "img" / "im0000.txt").write_text("a caption")
    embed_source(str(tmp_path / "img"), SPEC, tmp_path / "folder", views=2, workers=0, progress=False)
    assert computed.take() == 6 * 3
    # fewer views of the same seed and keys, or none: the first slots of the stored rows
    for views in (1, 0):
        cache = embed_source(src, SPEC, tmp_path / f"views{views}", views=views, workers=0, progress=False)
        assert computed.take() == 0, views
        embed_source(src, SPEC, tmp_path / f"fresh{views}", views=views, workers=0, progress=False, reuse=False)
        assert computed.take() == 6 * (1 + views)
        assert _tree(tmp_path / f"views{views}") == _tree(tmp_path / f"fresh{views}")
        assert cache.views == views


def test_a_deleted_source_cache_or_a_damaged_index_costs_reuse_only(tmp_path, capsys, computed):
    from littune.cache.registry import index_path

    src = str(_csv(tmp_path / "pairs.csv", _images(tmp_path, 6), "a drawing of"))
    embed_source(src, SPEC, tmp_path / "a", workers=0, progress=False)
    shard = tmp_path / "a" / "shards" / "00000.npy"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")  # damaged in place: its sha256 no longer matches
    assert embed_source(src, SPEC, tmp_path / "b", workers=0, progress=False).reuse.embedded == 6
    shutil.rmtree(tmp_path / "b")  # deleted: its rows are not found
    assert embed_source(src, SPEC, tmp_path / "c", workers=0, progress=False).reuse.embedded == 6
    assert computed.take() == 18
    saved = index_path().read_bytes()
    try:
        index_path().write_bytes(b"not a database" * 100)
        capsys.readouterr()
        cache = embed_source(src, SPEC, tmp_path / "d", workers=0, progress=False)
        assert computed.take() == 6 and len(cache) == 6
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"littune: warning: the feature index {index_path()} cannot be used")
    finally:
        index_path().write_bytes(saved)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_kill_minus_9_during_a_reusing_embed_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    """Every shard mixes copied and computed rows; SIGKILL twice, resume (with the feature index gone: the
    decisions pinned on disk are followed): the cache an uninterrupted run writes, with reuse or without it."""
    n = 480
    names = _images(tmp_path, n, ext="jpg", size=(320, 240))
    args = ["--tower", tiny_tower_arg(), "--shard-size", "16", "--batch-size", "5", "--threads", "1",
            "--workers", "1", "-q"]
    assert main(["embed", str(_csv(tmp_path / "half.csv", names[::2], "old")), "--out", str(tmp_path / "half"),
                 *args]) == 0
    source = str(_csv(tmp_path / "all.csv", names, "new"))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "littune", "embed", source, *args, "--out", str(out)]
    for wait_for in (2, 9):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if (out / "shards").is_dir() and len(list((out / "shards").glob("?????.json"))) >= wait_for:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        assert list((out / "shards").glob("?????.reuse"))  # the decisions of the shards still to write
    # resumed with an empty feature index: the pinned decisions still copy what the killed runs chose to copy
    empty = {**_env(), "LITTUNE_CACHE": str(tmp_path / "empty")}
    res = subprocess.run(cmd, env=empty, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("embedded ") and " new images, reused " in res.stdout
    assert main(["embed", source, *args, "--out", str(tmp_path / "plain"), "--no-reuse"]) == 0
    assert main(["embed", source, *args, "--out", str(tmp_path / "reusing")]) == 0
    killed = _tree(out)
    assert killed == _tree(tmp_path / "plain") == _tree(tmp_path / "reusing")
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.endswith(".reuse")]
