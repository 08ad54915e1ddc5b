"""Towers from where users keep them: Hugging Face hub ids (offline here) and an inner ONNX output."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from littune.errors import LittuneError
from littune.towers.fingerprint import fingerprint_from_spec
from littune.towers.image import build_image_tower, parse_image_tower

from local_hub import NoSuchRepo
from token_net import exported

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------- hf:<id>
def _tiny_vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48)
    torch.manual_seed(0)
    ViTModel(cfg).eval().save_pretrained(folder)  # with its pooler: no weight left to random init
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}))


def _run(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full.update(env, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def test_hf_hub_id_keeps_the_id_and_is_not_fingerprinted_from_the_spec():
    spec = parse_image_tower("hf:google/vit-base-patch16-224#mean")
    assert spec == {"type": "hf", "path": "google/vit-base-patch16-224", "pooling": "mean"}
    assert fingerprint_from_spec(spec) is None  # only the built tower knows its weights
    with pytest.raises(FileNotFoundError, match="no config.json"):  # a path that is no hub id: as before
        build_image_tower("hf:/does/not/exist")


def test_hf_hub_id_offline_not_cached_is_one_line_naming_id_and_hf_hub_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest / make test
    with pytest.raises(LittuneError) as err:
        build_image_tower("hf:google/vit-base-patch16-224")
    msg = str(err.value)
    assert "\n" not in msg and "hf:google/vit-base-patch16-224" in msg and "HF_HUB_OFFLINE=1" in msg


def test_hf_hub_id_offline_loads_from_the_hugging_face_cache(tmp_path):
    """A hub id already in the cache (the layout huggingface_hub writes) builds offline and equals the folder."""
    from conftest import CAPTIONS, TINY_TEXT

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _tiny_vit(repo / "snapshots" / commit)
    code = f"""
import torch
from littune.towers.image import build_image_tower
hub = build_image_tower("hf:someorg/tiny-vit#mean").eval()
folder = build_image_tower("hf:{repo / 'snapshots' / commit}#mean").eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    assert torch.allclose(hub(x), folder(x), atol=1e-6)
weights = lambda t: t.fingerprint().split("|", 1)[1]
assert hub.spec["path"] == "someorg/tiny-vit" and hub.name == "hf:tiny-vit#mean" and weights(hub) == weights(folder)
assert hub.preprocess == folder.preprocess and hub.preprocess.interpolation == "bilinear"
# A model trained on it saves the tower's config and pre-processing and reloads offline without the id.
from littune import LiTConfig, LiTModel
cfg = LiTConfig(setting="uu", image_tower="hf:someorg/tiny-vit#mean", text_tower={TINY_TEXT!r}, embed_dim=16)
model = LiTModel.from_config(cfg, captions={CAPTIONS[:11]!r})
model.save_pretrained("{tmp_path / 'saved'}")
again = LiTModel.from_pretrained("{tmp_path / 'saved'}")
assert again.image_tower.preprocess == hub.preprocess
with torch.no_grad():
    assert torch.allclose(again.image_tower.eval()(x), model.image_tower.eval()(x), atol=1e-6)
print("ok")
"""
    out = _run(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_hf_hub_id_online_but_not_found_is_one_line_and_fast(tmp_path):
    """HF_HUB_OFFLINE unset: from_pretrained asks the hub; a hub that has no such id gives one line."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = """
from littune.errors import LittuneError
from littune.towers.image import build_image_tower
try:
    build_image_tower("hf:someorg/no-such-vit")
except LittuneError as e:
    print(e)
"""
    try:
        start = time.monotonic()
        out = _run(code, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                          "HF_HUB_ETAG_TIMEOUT": "2"}, timeout=60)
        took = time.monotonic() - start
    finally:
        server.shutdown()
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout, out.stderr[-2000:])
    assert lines[0].startswith("hf:someorg/no-such-vit: not a local folder") and "HF_HUB_OFFLINE is not set" in lines[0]
    assert took < 45, took


# ---------------------------------------------------------------------------------------- onnx:#output
@pytest.fixture
def token_onnx(tmp_path):
    return exported(tmp_path / "classifier.onnx")


PRE = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


def test_onnx_inner_output_is_the_tower_with_cls_and_mean_pooling(token_onnx):
    net, path, inner = token_onnx
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens, logits = net.features(x), net(x)
    cls = build_image_tower({**parse_image_tower(f"onnx:{path}#output={inner}&pool=cls"), "preprocess": PRE})
    mean = build_image_tower({**parse_image_tower(f"onnx:{path}#output={inner}&pool=mean"), "preprocess": PRE})
    plain = build_image_tower({"type": "onnx", "path": str(path), "preprocess": PRE})
    assert torch.allclose(cls(x), tokens[:, 0], atol=1e-5)
    assert torch.allclose(mean(x), tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(plain(x), logits, atol=1e-5) and cls.dim == 16 and plain.dim == 5
    none = build_image_tower({"type": "onnx", "path": str(path), "output": "logits", "pooling": "none"})
    assert torch.allclose(none(x), logits, atol=1e-5)
    # The output read and the pooling are part of the fingerprint, and the spec alone gives it.
    prints = {t.fingerprint() for t in (cls, mean, plain)}
    assert len(prints) == 3 and plain.fingerprint().startswith("onnx:classifier.onnx|w=")
    for tower in (cls, mean, plain):
        assert fingerprint_from_spec(tower.spec) == tower.fingerprint()


def test_onnx_inner_output_runs_through_its_own_session(token_onnx):
    from littune.towers.runtime import open_runner

    net, path, inner = token_onnx
    tower = build_image_tower({"type": "onnx", "path": str(path), "output": inner, "pooling": "cls",
                               "preprocess": PRE})
    runner = open_runner(tower, "auto", quiet=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net.features(x)[:, 0].numpy()
    assert runner.name == "onnxruntime" and abs(runner(x) - want).max() < 1e-5


def test_onnx_output_not_in_the_graph_or_bad_pool_is_one_line(token_onnx):
    _, path, inner = token_onnx
    with pytest.raises(LittuneError) as err:
        build_image_tower(f"onnx:{path}#output=/norm/NoSuchNode_output_0")
    msg = str(err.value)
    assert "\n" not in msg and "'/norm/NoSuchNode_output_0'" in msg and "logits" in msg and inner in msg
    with pytest.raises(LittuneError, match="cls|mean|none"):
        build_image_tower(f"onnx:{path}#output={inner}&pool=max")
    with pytest.raises(LittuneError, match="output=NAME"):
        parse_image_tower(f"onnx:{path}#layer={inner}")
    with pytest.raises(LittuneError, match="no output 3"):
        build_image_tower(f"onnx:{path}#output=3")


def test_a_model_on_an_inner_onnx_output_saves_and_reloads_with_the_same_fingerprint(token_onnx, tmp_path):
    from littune import LiTConfig, LiTModel

    from conftest import CAPTIONS, TINY_TEXT

    _, path, inner = token_onnx
    spec = {"type": "onnx", "path": str(path), "output": inner, "pooling": "mean", "preprocess": PRE}
    model = LiTModel.from_config(LiTConfig(setting="Lu", image_tower=spec, text_tower=dict(TINY_TEXT), embed_dim=16),
                                 captions=CAPTIONS)
    model.save_pretrained(tmp_path / "saved")
    again = LiTModel.from_pretrained(tmp_path / "saved")
    assert again.image_fingerprint == model.image_fingerprint == again.image_tower.fingerprint()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(again.image_tower(x), model.image_tower(x), atol=1e-6)


# ---------------------------------------------------------------------------------------- bad input
def _timm_expected() -> str:
    """What ``timm:`` + an unknown name says: the close names where timm imports, how to get it where not."""
    try:
        from littune.towers.timm_tower import import_timm

        import_timm()
    except ImportError:
        return "needs `pip install 'littune[timm]'`"
    return "is not a timm model (close names: test_vit"


@pytest.mark.parametrize("case", ["hub id offline", "timm name", "onnx output"])
def test_a_bad_tower_is_one_line_from_littune_embed_and_the_cache_there_is_untouched(case, token_onnx, tmp_path,
                                                                                      capsys):
    from data_fixtures import write_csv

    from littune.cli import main

    _, path, _ = token_onnx
    tower, expected = {
        "hub id offline": ("hf:google/vit-base-patch16-224", "HF_HUB_OFFLINE=1"),
        "timm name": ("timm:test_vti", _timm_expected()),
        "onnx output": (f"onnx:{path}#output=/norm/NoSuchNode_output_0", "has no output '/norm/NoSuchNode_output_0'"),
    }[case]
    source = write_csv(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "mine.txt").write_text("keep me")
    assert main(["embed", str(source), "--out", str(cache), "--tower", tower, "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("littune embed: error: ") and expected in err[0], err
    assert Path(tower.split("#")[0]).name in err[0]  # the message names what was asked for
    assert [p.name for p in cache.iterdir()] == ["mine.txt"] and (cache / "mine.txt").read_text() == "keep me"
