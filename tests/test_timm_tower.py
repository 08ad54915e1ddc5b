"""``timm:<name>[#pool]`` towers on timm's own tiny ``test_*`` models (random weights, no download).

The whole file skips, saying why, where ``import timm`` fails: timm imports torchvision, and the
torchvision wheels on PyPI load compiled operators built for the CUDA build of torch, so beside a
CPU-only torch ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not
exist`` (littune's :func:`~littune.towers.timm_tower.import_timm` turns it into an ImportError).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from littune.errors import LittuneError
from littune.towers.fingerprint import fingerprint_from_spec
from littune.towers.image import build_image_tower, parse_image_tower
from littune.towers.timm_tower import import_timm

from local_hub import NoSuchRepo

try:
    timm = import_timm()
except ImportError as e:
    pytest.skip(f"timm does not import here ({e})", allow_module_level=True)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _twins(name: str, pools: tuple[str | None, ...]):
    """Towers of one timm model with the same (seeded random) weights and each pooling in ``pools``."""
    towers = []
    for pool in pools:
        tower = build_image_tower({"type": "timm", "name": name, "pool": pool}, pretrained=False).eval()
        if towers:
            tower.load_state_dict(towers[0].state_dict())
        towers.append(tower)
    return towers


def test_timm_spec_keeps_name_and_pool_and_only_the_built_tower_knows_its_weights():
    assert parse_image_tower("timm:test_vit") == {"type": "timm", "name": "test_vit", "pool": None}
    assert parse_image_tower("timm:test_vit#avg") == {"type": "timm", "name": "test_vit", "pool": "avg"}
    assert parse_image_tower("timm:test_vit#pool=token")["pool"] == "token"
    assert parse_image_tower("timm:test_resnet#")["pool"] == ""  # timm's global_pool='': no pooling
    assert fingerprint_from_spec("timm:test_vit") is None


def test_timm_tower_gives_the_models_pooled_features_and_its_data_config_preprocessing(one_thread):
    torch.manual_seed(0)
    tower = build_image_tower("timm:test_resnet", pretrained=False).eval()
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    net.load_state_dict(tower.net.state_dict())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(tower(x), net(x))
    assert tower.dim == net.num_features == 96 and tower.name == "timm:test_resnet"
    config = timm.data.resolve_model_data_config(net)  # 160 px, crop_pct 0.95, bilinear, mean/std 0.5
    p = tower.preprocess
    assert (p.size, p.resize_to, p.interpolation) == (160, int(160 / config["crop_pct"]), config["interpolation"])
    assert (p.mean, p.std) == (tuple(config["mean"]), tuple(config["std"])) and p.interpolation == "bilinear"


def test_timm_pool_is_timms_global_pool_and_unpooled_outputs_are_pooled_as_littune_pools(one_thread):
    x = torch.randn(2, 3, 160, 160)
    own, token, none = _twins("test_vit", (None, "token", ""))
    cnn_none, cnn_avg = _twins("test_resnet", ("", "avg"))
    with torch.no_grad():
        assert torch.allclose(own(x), token(x)) and torch.allclose(none(x), token(x))  # the CLS token
        assert torch.allclose(cnn_none(x), cnn_avg(x), atol=1e-6)  # a map: its mean over positions
    avg = build_image_tower("timm:test_vit#avg", pretrained=False)  # timm gives it an fc_norm instead
    assert "fc_norm.weight" in dict(avg.net.named_parameters()) and avg.dim == own.dim == 64
    assert avg.name == "timm:test_vit#pool=avg" and own.name == "timm:test_vit"
    # Same weights, another pooling: another fingerprint (it keys the embedding cache).
    assert own.fingerprint() != token.fingerprint() != none.fingerprint()
    assert own.fingerprint().split("|")[1:] == token.fingerprint().split("|")[1:]


def test_a_lit_model_on_a_timm_tower_saves_and_reloads_with_its_weights(tmp_path, one_thread):
    from conftest import CAPTIONS, TINY_TEXT

    from littune import LiTConfig, LiTModel

    torch.manual_seed(0)
    config = LiTConfig(setting="uu", image_tower="timm:test_efficientnet#avg", text_tower=dict(TINY_TEXT),
                       embed_dim=16)
    model = LiTModel.from_config(config, captions=CAPTIONS)
    model.save_pretrained(tmp_path / "saved")
    again = LiTModel.from_pretrained(tmp_path / "saved")
    assert again.image_fingerprint == model.image_fingerprint == again.image_tower.fingerprint()
    assert again.preprocess == model.preprocess and again.preprocess.size == 160
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(again.encode_image(x), model.eval().encode_image(x), atol=1e-6)


def test_a_timm_name_that_does_not_exist_is_one_line_with_close_names():
    with pytest.raises(LittuneError) as err:
        build_image_tower("timm:test_vti", pretrained=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("timm:test_vti is not a timm model") and "test_vit" in msg
    with pytest.raises(LittuneError) as err:
        build_image_tower("timm:test_vit#pool=bogus", pretrained=False)
    assert "\n" not in str(err.value) and "timm:test_vit#pool=bogus" in str(err.value)


def test_timm_pretrained_offline_not_cached_is_one_line_naming_name_and_hf_hub_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest / make test
    with pytest.raises(LittuneError) as err:
        build_image_tower("timm:test_vit")  # pretrained: timm's hub download, offline
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("timm:test_vit:") and "HF_HUB_OFFLINE=1" in msg


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    full.update(env, PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_timm_pretrained_online_but_not_on_the_hub_is_one_line(tmp_path):
    """HF_HUB_OFFLINE unset: timm asks the hub (here a local one that has nothing) and littune says so in a line."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoSuchRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = """
from littune.errors import LittuneError
from littune.towers.image import build_image_tower
try:
    build_image_tower("timm:test_vit")
except LittuneError as e:
    print(e)
"""
    try:
        out = _run(code, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                          "HF_HUB_ETAG_TIMEOUT": "2"})
    finally:
        server.shutdown()
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 1, (out.stdout, out.stderr[-2000:])
    assert lines[0].startswith("timm:test_vit: cannot download the pre-trained weights (HF_HUB_OFFLINE is not set)")


def test_timm_pretrained_weights_come_offline_from_the_hugging_face_cache(tmp_path):
    """Weights where timm's own download puts them (the hub cache's layout) load offline, no network."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model("test_vit", pretrained=False).eval()  # with its classifier, as published
    hub_id = net.pretrained_cfg["hf_hub_id"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(net.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    torch.save(torch.randn(2, 3, 160, 160), tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(net.forward_head(net.forward_features(torch.load(tmp_path / "x.pt")), pre_logits=True),
                   tmp_path / "want.pt")
    code = f"""
import torch
from littune.towers.image import build_image_tower
tower = build_image_tower("timm:test_vit").eval()
x, want = torch.load("{tmp_path / 'x.pt'}", weights_only=True), torch.load("{tmp_path / 'want.pt'}", weights_only=True)
with torch.no_grad():
    assert torch.allclose(tower(x), want, atol=1e-5), (tower(x) - want).abs().max()
print("ok")
"""
    out = _run(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
