"""Model directories: save_pretrained / from_pretrained, in a fresh process, bit-identical."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import littune
from littune import LiTConfig, LiTModel

SCRIPT = """
import sys, numpy as np, torch, littune
m = littune.load(sys.argv[1])
torch.manual_seed(0)
x = torch.rand(3, 3, m.preprocess.size, m.preprocess.size)
with torch.no_grad():
    img = m.encode_image(x)
    txt = m.encode_text(**m.tokenize(["a red apple", "猫が好きです", "un chat noir"]))
np.save(sys.argv[2], torch.cat([img, txt]).numpy())
"""


def _embed_here(model):
    torch.manual_seed(0)
    x = torch.rand(3, 3, model.preprocess.size, model.preprocess.size)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(**model.tokenize(["a red apple", "猫が好きです", "un chat noir"]))
    return torch.cat([img, txt]).numpy()


@pytest.mark.parametrize("setting,loss", [("Lu", "softmax"), ("Uu", "sigmoid")])
def test_round_trip_in_a_fresh_process(tiny_model, tmp_path, setting, loss):
    model = tiny_model(setting, loss=loss).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors", "text"]
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m"), str(tmp_path / "e.npy")], check=True)
    assert np.array_equal(np.load(tmp_path / "e.npy"), _embed_here(model))
    again = littune.load(tmp_path / "m")
    assert again.logit_scale.item() == 2.5
    assert again.setting.name == setting
    assert (again.logit_bias is not None) == (loss == "sigmoid")


def test_package_tower_stored_by_reference(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    cfg = LiTConfig(setting="Lu", text_tower={"type": "transformer", "width": 32, "depth": 1, "heads": 2,
                                              "context_length": 8, "vocab_size": 100}, embed_dim=16)
    model = LiTModel.from_config(cfg, captions=["a cat", "a dog"] * 10)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["image_tower_by_reference"] is True
    assert meta["image_fingerprint"].startswith("efficientnet-lite0|w=")
    assert (tmp_path / "model.safetensors").stat().st_size < 1_000_000  # no 4.7M-parameter copy
    # A different installed tower (here: a tampered fingerprint) is refused with both fingerprints named.
    meta["image_fingerprint"] = "efficientnet-lite0|w=0000000000000000|p=00000000"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="0000000000000000"):
        littune.load(tmp_path)


def test_unlocked_tower_weights_are_saved(tiny_model, tmp_path):
    model = tiny_model("Uu")
    with torch.no_grad():
        next(model.image_tower.parameters()).add_(1.0)  # as if trained
    model.save_pretrained(tmp_path)
    again = littune.load(tmp_path)
    assert torch.equal(next(again.image_tower.parameters()), next(model.image_tower.parameters()))


def test_errors(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        littune.load(tmp_path)
    with pytest.raises(ValueError, match="Valid settings"):
        tiny_config("XY")
    with pytest.raises(ValueError, match="loss"):
        tiny_config(loss="hinge")
    with pytest.raises(ValueError, match="captions"):
        LiTModel.from_config(tiny_config())


# The fields a model directory's config.json held before TrainConfig.model and LiTConfig became one class.
OLD_CONFIG_KEYS = ("setting", "image_tower", "text_tower", "embed_dim", "image_head", "text_head",
                   "temperature_init", "loss", "bias_init")


def test_a_model_saved_before_the_config_merge_still_loads(tiny_model, tmp_path):
    model = tiny_model("Lu", loss="sigmoid").eval()
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert set(OLD_CONFIG_KEYS) <= set(meta["config"])
    # Exactly what the old writer wrote: those nine keys, towers as full specs (dicts).
    meta["config"] = {k: meta["config"][k] for k in OLD_CONFIG_KEYS}
    assert isinstance(meta["config"]["image_tower"], dict) and isinstance(meta["config"]["text_tower"], dict)
    (tmp_path / "config.json").write_text(json.dumps(meta, indent=2))
    again = littune.load(tmp_path)
    assert again.config.loss == "sigmoid" and again.logit_bias is not None
    assert np.array_equal(_embed_here(again), _embed_here(model))
    meta["config"]["from_the_future"] = 1
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="config.json.*from_the_future"):
        littune.load(tmp_path)
