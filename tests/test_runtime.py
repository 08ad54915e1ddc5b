"""Runtimes for locked towers: onnxruntime and torch give the same features; the export is kept, checked
and redone when damaged; a tower that cannot be exported falls back to torch, saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from littune.errors import LittuneError
from littune.towers.runtime import ONNXRunner, TorchRunner, export_dir, export_onnx, open_runner
from littune.towers.image import build_image_tower
from littune.towers.tiny import SPEC

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LITTUNE_CACHE", str(tmp_path / "littune-cache"))


def _pixels(tower, n=6, seed=1):
    s = tower.preprocess.size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _eager(tower, x):
    with torch.inference_mode():
        return tower.eval()(x).numpy()


def assert_agree(a: np.ndarray, b: np.ndarray, max_abs: float):
    """Within float16 rounding: every row's cosine > 0.99999 and the largest difference below ``max_abs``."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99999, cos.min()
    assert np.abs(a - b).max() < max_abs, np.abs(a - b).max()


def test_onnxruntime_matches_torch_on_a_torch_module_tower():
    tower = build_image_tower(SPEC)
    x = _pixels(tower)
    runner = open_runner(tower, "onnxruntime", threads=1)
    assert isinstance(runner, ONNXRunner)
    assert_agree(runner(x), _eager(tower, x), 1e-5)


def _tiny_vit_tower(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=48)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        '{"size": {"height": 32, "width": 32}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}')
    return build_image_tower(f"hf:{tmp_path / 'vit'}#mean")


def test_onnxruntime_matches_torch_on_a_hugging_face_vit(tmp_path):
    tower = _tiny_vit_tower(tmp_path)
    x = _pixels(tower)
    runner = open_runner(tower, "onnxruntime", threads=1)
    assert isinstance(runner, ONNXRunner)
    assert_agree(runner(x), _eager(tower, x), 1e-4)


@pytest.mark.real
def test_onnxruntime_matches_torch_on_efficientnet_lite0_within_float16_rounding():
    pytest.importorskip("efficientnet_lite_pytorch")
    tower = build_image_tower("efficientnet-lite0")
    x = _pixels(tower, n=4)
    want = _eager(tower, x)
    got = open_runner(tower, "onnxruntime", threads=2)(x)
    # float16 storage of the cache rounds features of this size by ~1e-3; the runtimes differ far less
    assert_agree(got, want, 1e-4)
    chan_last = TorchRunner(tower)
    assert_agree(chan_last(x), want, 1e-4)
    chan_last.close()


def test_torch_runner_channels_last_agrees_and_gives_the_tower_back():
    tower = build_image_tower(SPEC)
    x = _pixels(tower)
    want = _eager(tower, x)
    runner = TorchRunner(tower)
    assert runner.channels_last
    assert_agree(runner(x), want, 1e-5)
    runner.close()
    assert all(p.is_contiguous() for p in tower.parameters())
    assert np.array_equal(_eager(tower, x), want)  # the tower computes exactly what it did before


def test_export_is_kept_per_fingerprint_and_reused():
    tower = build_image_tower(SPEC)
    path = export_onnx(tower)
    assert path.parent == export_dir(tower)
    record = json.loads((path.parent / "tower.json").read_text())
    assert record["fingerprint"] == tower.fingerprint() and record["bytes"] == path.stat().st_size
    stamp = path.stat().st_mtime_ns
    assert export_onnx(build_image_tower(SPEC)) == path
    assert path.stat().st_mtime_ns == stamp  # not exported again
    other = build_image_tower({**SPEC, "kwargs": {"seed": 1}})  # other weights: another fingerprint
    assert export_dir(other) != export_dir(tower)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete the record", "delete the graph"])
def test_damaged_export_is_exported_again(damage):
    tower = build_image_tower(SPEC)
    x = _pixels(tower)
    path = export_onnx(tower)
    good = path.read_bytes()
    if damage == "flip a byte":
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "delete the record":
        (path.parent / "tower.json").unlink()
    else:
        path.unlink()
    again = export_onnx(tower)
    assert again == path and again.read_bytes() == good  # the same export, byte for byte
    assert_agree(ONNXRunner(again, threads=1)(x), _eager(tower, x), 1e-5)


def test_a_record_of_another_tower_is_not_trusted():
    tower = build_image_tower(SPEC)
    path = export_onnx(tower)
    rec = json.loads((path.parent / "tower.json").read_text())
    (path.parent / "tower.json").write_text(json.dumps({**rec, "fingerprint": "other|w=0|p=0"}))
    stamp = path.stat().st_mtime_ns
    export_onnx(tower)
    assert path.stat().st_mtime_ns != stamp
    assert json.loads((path.parent / "tower.json").read_text())["fingerprint"] == tower.fingerprint()


class DataDependent(nn.Module):
    """A tower whose forward leaves torch (numpy): tracing freezes it, so its export is wrong."""

    def forward(self, x):
        scale = float(np.abs(x.detach().numpy()).mean())
        return x.mean(dim=(2, 3)) * scale


def data_dependent():
    return DataDependent()


def test_a_tower_whose_export_disagrees_falls_back_to_torch_saying_why(capfd, monkeypatch):
    monkeypatch.setenv("LITTUNE_ONNX_EXPORTER", "torchscript")  # no fallback to dynamo, which captures the numpy
    tower = build_image_tower({"type": "torch", "factory": "test_runtime:data_dependent",
                               "preprocess": {"size": 16, "resize": 16}})
    runner = open_runner(tower, "auto")
    assert isinstance(runner, TorchRunner)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runtime torch for" in err[0] and "disagrees with torch" in err[0]
    with pytest.raises(LittuneError, match="disagrees with torch"):
        open_runner(tower, "onnxruntime")
    assert not (export_dir(tower) / "tower.json").exists()  # a wrong export is never recorded


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(LittuneError, match="unknown runtime 'tensorrt'; use one of auto, torch, onnxruntime"):
        open_runner(build_image_tower(SPEC), "tensorrt")


def test_embed_on_either_runtime_gives_the_same_cache_up_to_float16_rounding(tmp_path):
    from littune.cache import embed_source
    from PIL import Image

    rows = ["image,caption"]
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,picture {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    tower = build_image_tower(SPEC)
    caches = {rt: embed_source(tmp_path / "pairs.csv", tower, tmp_path / rt, runtime=rt, workers=0, dtype="float32",
                               progress=False, shard_size=5) for rt in ("torch", "onnxruntime")}
    a, b = (caches[rt].features(np.arange(12)) for rt in ("torch", "onnxruntime"))
    assert_agree(a, b, 1e-5)
    assert caches["torch"].tower_fingerprint == caches["onnxruntime"].tower_fingerprint == tower.fingerprint()
    for rt, cache in caches.items():
        assert cache.manifest["runtime"] == rt
        assert {s["runtime"] for s in cache.manifest["shards"]} == {rt}
    assert embed_source(tmp_path / "pairs.csv", tower, tmp_path / "auto", workers=0, progress=False
                        ).manifest["runtime"] == "onnxruntime"  # auto, on a CPU, for a tower that exports


def test_hf_poolings_have_their_own_fingerprints_exports_and_caches(tmp_path):
    """`hf:DIR#cls` and `hf:DIR#mean` give other features: two fingerprints, two ONNX exports (the #mean
    cache was the #cls graph's, bit for bit, when the fingerprint left the pooling out), and a cache of
    one is refused for the other."""
    from littune.cache import embed_source
    from littune.errors import StaleCacheError
    from littune.train.trainer import tower_fingerprint
    from PIL import Image

    mean = _tiny_vit_tower(tmp_path)
    cls = build_image_tower(f"hf:{tmp_path / 'vit'}#cls")
    assert cls.fingerprint() != mean.fingerprint()
    assert cls.fingerprint().startswith("hf:vit#cls|w=") and mean.fingerprint().startswith("hf:vit#mean|w=")
    x = _pixels(cls)
    paths = export_onnx(cls), export_onnx(mean)
    assert paths[0] != paths[1]
    for path, tower in zip(paths, (cls, mean)):
        assert_agree(ONNXRunner(path, threads=1)(x), _eager(tower, x), 1e-4)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{i}.png,picture {i}\n" for i in range(4)))
    caches = [embed_source(tmp_path / "pairs.csv", t, tmp_path / name, runtime="onnxruntime", workers=0,
                           dtype="float32", progress=False) for t, name in ((cls, "cls"), (mean, "mean"))]
    a, b = (c.features(np.arange(4)) for c in caches)
    assert np.abs(a - b).max() > 0.01  # not the same graph's features
    assert_agree(b, _eager(mean, torch.stack([mean.preprocess.eval(Image.open(tmp_path / f"{i}.png").convert("RGB"))
                                              for i in range(4)])), 1e-3)
    expected = tower_fingerprint({"type": "hf", "path": str(tmp_path / "vit"), "pooling": "mean"})
    caches[1].check(tower_fingerprint=expected)
    with pytest.raises(StaleCacheError, match="hf:vit#cls"):
        caches[0].check(tower_fingerprint=expected)
