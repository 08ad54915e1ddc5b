"""Token caches (``littune embed --tokens [GRID]``): the tower's spatial map beside its pooled features.

The map is the one the tower pools, from the same forward pass (torch and onnxruntime); the grid is part of
the cache's plan (a resume keeps working, a change is refused); a killed run resumes to the bytes of an
uninterrupted one; a reused row brings its tokens or is not reused; heat maps drawn from cached tokens are
the ones running the tower gives; reading tokens keeps memory flat.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import tiny_tower_arg, write_csv, write_images
from littune.cache import EmbeddingCache, embed_source, write_cache
from littune.cli import main
from littune.data import load_image, open_source
from littune.errors import LittuneError
from littune.towers.image import build_image_tower
from littune.towers.spatial import spatial_features
from littune.towers.tiny import SPEC

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tower():
    return build_image_tower(SPEC).eval()


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _map(tower, img) -> torch.Tensor:
    """The tower's map ``(h, w, F)`` and pooled features of one image, run in torch."""
    with torch.inference_mode():
        sf = spatial_features(tower, tower.preprocess.eval(img)[None])
    return sf.features[0], sf.pooled[0]


def _aged_images(root: Path, n: int) -> list[str]:
    """Images written an hour ago (a file modified within 2 s is never reused), relative to ``root``."""
    names = write_images(root / "img", n)
    t = time.time() - 3600
    for nm in names:
        os.utime(root / "img" / nm, (t, t))
    return [f"img/{nm}" for nm in names]


def _csv(path: Path, names: list[str], caption: str) -> Path:
    path.write_text("image,caption\n" + "".join(f"{nm},{caption} {nm}\n" for nm in names))
    return path


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_round_trip_stores_the_map_the_tower_pools_from_the_same_pass(tmp_path, tower, runtime):
    src = open_source(write_csv(tmp_path / "data", n=7))
    cache = embed_source(src, tower, tmp_path / "c", tokens=True, views=1, shard_size=3, batch_size=4, workers=0,
                         progress=False, runtime=runtime, reuse=False)
    assert cache.has_tokens and cache.token_grid == (4, 4) and cache.token_dim == 32
    t = cache.manifest["tokens"]
    assert (t["grid"], t["dim"], t["pool"], t["exact"]) == ([4, 4], 32, "none", True) and "feature map" in t["how"]
    order = [6, 0, 3, 3, 1]
    got = cache.tokens(order)
    assert got.dtype == np.float32 and got.shape == (5, 16, 32)
    for k, i in enumerate(order):
        fmap, pooled = _map(tower, load_image(src.records()[i].path))
        np.testing.assert_allclose(got[k], fmap.reshape(16, 32).numpy(), rtol=2e-3, atol=2e-3)  # float16
        np.testing.assert_allclose(cache.features([i])[0], pooled.numpy(), rtol=2e-3, atol=2e-3)
    # the stored pooled features are the mean of the stored tokens (exact, to float16 rounding)
    np.testing.assert_allclose(got.mean(axis=1), cache.features(order), atol=2e-3)
    # one token file per shard, (n, h*w, F) float16, covered by the commit record and the manifest
    for s, entry in enumerate(cache.manifest["shards"]):
        stored = np.load(tmp_path / "c" / entry["tokens"]["file"])
        assert entry["tokens"]["file"] == f"shards/{s:05d}.tokens.npy"
        assert stored.dtype == np.float16 and stored.shape == (entry["count"], 16, 32)
    assert cache.tokens([]).shape == (0, 16, 32)
    with pytest.raises(IndexError):
        cache.tokens([7])
    # a damaged token file is caught by the checksums like a damaged features file
    tok = tmp_path / "c" / "shards" / "00001.tokens.npy"
    tok.write_bytes(tok.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(LittuneError, match="00001.tokens.npy does not match its checksum"):
        EmbeddingCache.open(tmp_path / "c")


def test_a_grid_average_pools_the_map_and_only_bounds_it(tmp_path, tower):
    src = open_source(write_csv(tmp_path / "data", n=3))
    two = embed_source(src, tower, tmp_path / "g2", tokens=2, workers=0, progress=False, reuse=False)
    assert two.token_grid == (2, 2) and two.manifest["tokens"]["pool"] == "avg"
    assert two.manifest["tokens"]["exact"] and "average-pooled from 4 x 4 to 2 x 2" in two.manifest["tokens"]["how"]
    three = embed_source(src, tower, tmp_path / "g3", tokens=3, workers=0, progress=False, reuse=False)
    assert three.token_grid == (3, 3) and not three.manifest["tokens"]["exact"]  # uneven cells
    big = embed_source(src, tower, tmp_path / "g9", tokens=9, workers=0, progress=False, reuse=False)
    assert big.token_grid == (4, 4) and big.manifest["tokens"]["pool"] == "none"  # a grid bounds, never grows
    for i in range(3):
        fmap, _ = _map(tower, load_image(src.records()[i].path))
        for cache, g in ((two, 2), (three, 3)):
            want = F.adaptive_avg_pool2d(fmap.permute(2, 0, 1)[None], g)[0].permute(1, 2, 0).reshape(g * g, 32)
            np.testing.assert_allclose(cache.tokens([i])[0], want.numpy(), rtol=2e-3, atol=2e-3)


def test_the_grid_is_part_of_the_plan_so_a_change_is_refused_and_a_resume_keeps_working(tmp_path, tower):
    from littune.cache.format import make_plan, plan_hash

    src = open_source(write_csv(tmp_path / "data", n=4))
    out = tmp_path / "c"
    embed_source(src, tower, out, tokens=True, workers=0, progress=False, reuse=False)
    before = _tree(out)
    embed_source(src, tower, out, tokens=4, workers=0, progress=False, reuse=False)  # the same grid: resumed
    assert _tree(out) == before
    for other, says in ((2, "tokens {'grid': [4, 4]"), (None, "-> None")):
        with pytest.raises(LittuneError, match="started with other settings") as e:
            embed_source(src, tower, out, tokens=other, workers=0, progress=False, reuse=False)
        assert says in str(e.value)
        assert _tree(out) == before  # nothing lost
    plain = tmp_path / "plain"
    embed_source(src, tower, plain, workers=0, progress=False, reuse=False)
    with pytest.raises(LittuneError, match=r"tokens None -> \{'grid': \[4, 4\]"):
        embed_source(src, tower, plain, tokens=True, workers=0, progress=False, reuse=False)
    # a plan without tokens has no token field: caches made before token caches existed still resume
    kw = dict(dim=32, source_fingerprint="s", source="s", records=1, shard_size=1, dtype="float16", views=0, seed=0,
              max_pixels=None)
    assert "tokens" not in make_plan(tower, **kw)
    assert plan_hash(make_plan(tower, **kw)) != plan_hash(make_plan(tower, **kw, tokens={
        "grid": [4, 4], "dim": 32, "pool": "none", "exact": True, "how": ""}))
    with pytest.raises(LittuneError, match="tokens must be True"):
        embed_source(src, tower, tmp_path / "bad", tokens=0, workers=0, progress=False)


KILL_AT = """
import os, signal, sys
name = sys.argv[1]
def hook(event, args):  # SIGKILL as the file named argv[1] takes its name
    if event == "os.rename" and os.path.basename(str(args[1])) == name:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from littune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_killed_token_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path):
    csv_path = write_csv(tmp_path / "data", n=9)
    args = ["embed", str(csv_path), "--tower", tiny_tower_arg(), "--tokens", "--views", "1", "--shard-size", "3",
            "--workers", "0", "--no-reuse", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for out, kill in (("whole", None), ("killed", "00001.tokens.npy")):
        cmd = [sys.executable, "-c", KILL_AT, kill or "-", *args, "--out", str(tmp_path / out)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == (-signal.SIGKILL if kill else 0), done.stderr
    killed = tmp_path / "killed"
    assert (killed / "shards" / "00000.json").exists() and not (killed / "shards" / "00001.json").exists()
    assert not (killed / "manifest.json").exists()
    assert main([*args, "--out", str(killed)]) == 0
    assert _tree(killed) == _tree(tmp_path / "whole")


def test_onnxruntime_gives_torchs_map_from_the_same_pass(tower):
    from littune.cache.tokens import pooled_and_map
    from littune.towers.runtime import ONNXRunner, open_runner

    plain = open_runner(tower, "onnxruntime")
    both = open_runner(tower, "onnxruntime", spatial=pooled_and_map)
    assert isinstance(both, ONNXRunner) and both.path.name == "tower-map.onnx" and plain.path.name == "tower.onnx"
    assert [o.name for o in both.session.get_outputs()] == ["features", "map"]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pooled, fmap = both(x)
    with torch.inference_mode():
        sf = spatial_features(tower, x)
    np.testing.assert_allclose(fmap, sf.features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, sf.pooled.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, plain(x), rtol=1e-5, atol=1e-6)  # the features the plain graph gives
    np.testing.assert_allclose(fmap.mean(axis=(1, 2)), pooled, atol=1e-6)  # one pass: pooled is the map's mean
    # a row does not depend on the batch it is computed in (a resumed or reused row is the same bytes)
    p1, m1 = both(x[2:3])
    assert np.array_equal(m1[0], fmap[2]) and np.array_equal(p1[0], pooled[2])


def test_a_token_cache_reuses_only_rows_that_bring_their_tokens(tmp_path, tower):
    names = _aged_images(tmp_path, 5)
    kw = dict(workers=0, progress=False, shard_size=2)
    plain = embed_source(_csv(tmp_path / "a.csv", names, "a"), tower, tmp_path / "plain", **kw)
    assert plain.reuse.embedded == 5
    first = embed_source(_csv(tmp_path / "b.csv", names, "b"), tower, tmp_path / "tok", tokens=True, **kw)
    assert (first.reuse.embedded, first.reuse.reused) == (5, 0)  # the plain cache's rows have no tokens
    again = embed_source(_csv(tmp_path / "c.csv", names, "c"), tower, tmp_path / "tok2", tokens=True, **kw)
    assert (again.reuse.embedded, again.reuse.reused) == (0, 5)  # copied with their tokens
    assert np.array_equal(again.tokens(range(5)), first.tokens(range(5)))
    assert np.array_equal(again.features(range(5)), first.features(range(5)))
    fresh = embed_source(_csv(tmp_path / "d.csv", names, "c"), tower, tmp_path / "fresh", tokens=True, reuse=False, **kw)
    for name in ("00000.npy", "00000.tokens.npy", "00002.tokens.npy"):  # the bytes a run without reuse writes
        assert (tmp_path / "tok2" / "shards" / name).read_bytes() == (tmp_path / "fresh" / "shards" / name).read_bytes()
    want = fresh.tokens(range(5))
    other = embed_source(_csv(tmp_path / "e.csv", names, "e"), tower, tmp_path / "tok3", tokens=2, **kw)
    assert other.reuse.reused == 0  # another grid
    # rows whose token file is gone (or changed) are not copied: embedded again
    for cache in ("tok", "tok2", "fresh"):
        tok = tmp_path / cache / "shards" / "00001.tokens.npy"
        tok.write_bytes(tok.read_bytes()[:-2] + b"\0\0")
    last = embed_source(_csv(tmp_path / "f.csv", names, "f"), tower, tmp_path / "tok4", tokens=True, **kw)
    assert (last.reuse.embedded, last.reuse.reused) == (2, 3)
    assert np.array_equal(last.tokens(range(5)), want)
    # a cache without tokens still reuses the plain cache's rows (and never a token cache's)
    plain2 = embed_source(_csv(tmp_path / "g.csv", names, "g"), tower, tmp_path / "plain2", **kw)
    assert (plain2.reuse.embedded, plain2.reuse.reused) == (0, 5) and not plain2.has_tokens


def test_tokens_of_a_cache_without_them_is_one_line_naming_the_option(tmp_path, tower):
    src = open_source(write_csv(tmp_path / "data", n=2))
    cache = embed_source(src, tower, tmp_path / "c", workers=0, progress=False, reuse=False)
    assert not cache.has_tokens and cache.token_grid is None and cache.token_dim is None
    assert "tokens" not in cache.manifest and "tokens" not in cache.manifest["shards"][0]
    with pytest.raises(LittuneError) as e:
        cache.tokens([0])
    assert "was embedded without --tokens: littune embed" in str(e.value) and "--tokens" in str(e.value).split(":")[-1]
    assert "\n" not in str(e.value)
    # a tower littune reads no map from (an ONNX graph) is refused in one line before anything is written
    from littune.towers.runtime import export_onnx

    graph = {"type": "onnx", "path": str(export_onnx(tower)), "preprocess": SPEC["preprocess"]}
    with pytest.raises(LittuneError, match="^--tokens: onnx:tower.onnx: no spatial features") as e:
        embed_source(src, graph, tmp_path / "g", tokens=True, workers=0, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "g").exists()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_reading_tokens_keeps_memory_flat_and_maps_nothing(tmp_path):
    n, grid, dim = 3000, 7, 64  # 3000 x 49 x 64 float16 = 18.8 MB of tokens on disk
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((n, grid, grid, dim)).astype(np.float16)
    feats = tokens.astype(np.float32).mean(axis=(1, 2))
    spec = {**SPEC, "factory": "littune.towers.tiny:tiny_cnn", "kwargs": {"dim": dim}}
    write_cache(tmp_path / "c", feats, [f"image {i}" for i in range(n)], spec, tokens=tokens, shard_size=256)
    cache = EmbeddingCache.open(tmp_path / "c", max_open=4)
    assert cache.token_grid == (7, 7) and cache.manifest["tokens"]["pool"] == "none"
    assert np.array_equal(cache.tokens([5, 2999]), tokens[[5, 2999]].reshape(2, 49, dim).astype(np.float32))
    del tokens, feats
    cache.tokens(rng.integers(0, n, 64))  # warm up: buffers and files of a batch
    before = _rss()
    for _ in range(150):  # ~9600 random rows: the whole file about three times over
        batch = cache.tokens(rng.integers(0, n, 64))
    grown = _rss() - before
    assert batch.shape == (64, 49, dim)
    assert grown < 4 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB reading tokens"
    assert str(tmp_path / "c") not in Path("/proc/self/maps").read_text()  # pread, no memory map
    assert len(cache._token_files) <= 4


def test_embed_cli_documents_tokens_and_prints_their_bytes_per_image(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    assert "--tokens [GRID]" in capsys.readouterr().out
    csv_path = write_csv(tmp_path / "data", n=3)
    assert main(["embed", str(csv_path), "--tower", tiny_tower_arg(), "--out", str(tmp_path / "c"), "--tokens", "2",
                 "--workers", "0", "-q"]) == 0
    out = capsys.readouterr().out
    per_image = os.path.getsize(tmp_path / "c" / "shards" / "00000.tokens.npy") / 3
    assert f"tokens: 2 x 2 x 32 float16 per image, average-pooled; {per_image:,.0f} bytes per image on disk" in out


def test_tokens_before_the_source_says_where_to_put_it(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "data", n=1)
    with pytest.raises(SystemExit):
        main(["embed", "--tokens", str(csv_path), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"GRID must be a whole number >= 1, not {str(csv_path)!r}" in err
    assert "put it after SOURCE, or give one: --tokens 4 SOURCE" in err


LABELS = ["cat", "cup of coffee", "red square"]


def _lit(tower_spec):
    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel

    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=tower_spec, text_tower=dict(TINY_TEXT), embed_dim=16)
    return LiTModel.from_config(cfg, captions=CAPTIONS).eval()


def _same_heatmaps(model, cache, files, tolerance: float) -> float:
    """Heat maps of the cached images == those of running the tower on the files; returns the largest gap."""
    from littune.inference.heatmap import cached_heatmap, heatmap

    gap = 0.0
    for i, f in enumerate(files):
        ran, cached = heatmap(model, f, LABELS), cached_heatmap(model, cache, i, LABELS)
        assert cached.maps.shape == ran.maps.shape and cached.texts == ran.texts
        assert (cached.crop, cached.box, cached.image_size, cached.exact) == (ran.crop, ran.box, ran.image_size, ran.exact)
        assert cached.image is not None and cached.image.size == ran.image.size
        gap = max(gap, float(np.abs(cached.maps - ran.maps).max()), float(np.abs(cached.pooled - ran.pooled).max()))
        np.testing.assert_allclose(cached.probabilities, ran.probabilities, atol=tolerance)
    assert gap <= tolerance, gap
    return gap


def _photo_csv(root: Path) -> tuple[Path, list[Path]]:
    files = [DATA / "chelsea.jpg", DATA / "coffee.jpg"]
    root.mkdir(parents=True, exist_ok=True)
    return _csv(root / "photos.csv", [str(f) for f in files], "a photo"), files


def test_heatmaps_from_cached_tokens_are_those_of_running_the_tiny_tower(tmp_path):
    from littune.inference.heatmap import cached_heatmap

    model = _lit(SPEC)
    csv_path, files = _photo_csv(tmp_path)
    cache = embed_source(csv_path, model.image_tower, tmp_path / "c", tokens=True, workers=0, progress=False,
                         reuse=False)
    _same_heatmaps(model, cache, files, tolerance=2e-3)  # float16 tokens
    # without the image file the map covers the eval view's own square
    hm = cached_heatmap(model, tmp_path / "c", 0, LABELS, image=None)
    assert hm.maps.shape == (3, 4, 4)
    pooled = embed_source(csv_path, model.image_tower, tmp_path / "p", tokens=2, workers=0, progress=False, reuse=False)
    assert cached_heatmap(model, pooled, 1, LABELS).maps.shape == (3, 2, 2)
    plain = embed_source(csv_path, model.image_tower, tmp_path / "n", workers=0, progress=False, reuse=False)
    with pytest.raises(LittuneError, match="without --tokens"):
        cached_heatmap(model, plain, 0, LABELS)
    with pytest.raises(LittuneError, match="fingerprint"):  # another tower's cache
        cached_heatmap(_lit({**SPEC, "kwargs": {"seed": 1}}), cache, 0, LABELS)


@pytest.mark.real
def test_heatmaps_from_an_onnxruntime_token_cache_match_efficientnet_lite0_in_torch(tmp_path):
    """The main job's tower through onnxruntime (the map as a second output of the graph), stored as float16:
    the maps differ from torch's by at most 1e-3 in cosine (measured 1.7e-4 on these photos)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    model = _lit("efficientnet-lite0")
    csv_path, files = _photo_csv(tmp_path)
    cache = embed_source(csv_path, model.image_tower, tmp_path / "c", tokens=True, workers=0, progress=False,
                         reuse=False, runtime="onnxruntime")
    assert cache.manifest["runtime"] == "onnxruntime" and cache.token_grid == (7, 7) and cache.token_dim == 1280
    assert cache.manifest["tokens"]["exact"]
    _same_heatmaps(model, cache, files, tolerance=1e-3)
