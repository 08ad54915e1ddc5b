"""The two ONNX exporters (littune.towers.exporters): every graph kind littune writes through dynamo,
checked against torch; the fallback to TorchScript; the exporter in each record; fingerprints unchanged."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_TEXT

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from littune import LiTConfig, LiTModel  # noqa: E402
from littune.cache.tokens import pooled_and_map  # noqa: E402
from littune.errors import LittuneError  # noqa: E402
from littune.towers.image import build_image_tower  # noqa: E402
from littune.towers.runtime import ONNXRunner, export_onnx, open_runner  # noqa: E402
from littune.towers.tiny import SPEC  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a red apple", "ein roter Apfel", "猫が好きです", "x", "a caption far longer than the context allows " * 4]


def _model(head="linear"):
    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16, image_head=head)
    return LiTModel.from_config(cfg, captions=CAPTIONS).eval()


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def test_dynamo_tower_and_tower_map_graphs_agree_with_torch_at_other_batch_sizes(tmp_path):
    tower = build_image_tower(SPEC).eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, (pooled, fmap) = tower(x).numpy(), pooled_and_map(tower, x)
    plain = export_onnx(tower, tmp_path, exporter="dynamo")
    assert np.abs(ONNXRunner(plain)(x) - want).max() <= 1e-5
    both = export_onnx(tower, tmp_path, spatial=pooled_and_map, exporter="dynamo")
    got_pooled, got_map = ONNXRunner(both)(x)
    assert np.abs(got_pooled - pooled.numpy()).max() <= 1e-5 and np.abs(got_map - fmap.numpy()).max() <= 1e-5
    for stem in ("tower", "tower-map"):
        rec = json.loads((tmp_path / f"{stem}.json").read_text())
        assert rec["exporter"] == "dynamo" and rec["opset"] == _opset(tmp_path / f"{stem}.onnx") == 18


def test_the_runtime_exports_with_the_env_exporter_and_fingerprint_and_features_do_not_change(monkeypatch, tmp_path):
    monkeypatch.setenv("LITTUNE_ONNX_EXPORTER", "dynamo")
    monkeypatch.setenv("LITTUNE_CACHE", str(tmp_path))  # its own export cache: another test's TorchScript export is reused
    tower = build_image_tower(SPEC)
    before = tower.fingerprint()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    runner = open_runner(tower, "onnxruntime", threads=1)
    assert json.loads(runner.path.with_suffix(".json").read_text())["exporter"] == "dynamo"
    assert tower.fingerprint() == before
    scripted = ONNXRunner(export_onnx(tower, runner.path.parent / "ts", exporter="torchscript"))(x)
    got = runner(x)
    cos = (got * scripted).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(scripted, axis=1)
    assert cos.min() > 0.99999 and np.abs(got - scripted).max() <= 1e-5


@pytest.mark.parametrize("head", ["linear", "attention"])
def test_dynamo_text_and_image_graphs_match_littune_at_other_batch_and_sequence_sizes(tmp_path, head):
    import onnxruntime as ort
    from littune.export.onnx import export_onnx_model

    model = _model(head)
    record = export_onnx_model(model, tmp_path / "onnx", exporter="dynamo")
    assert record["text"]["exporter"] == record["image"]["exporter"] == "dynamo"
    assert json.loads((tmp_path / "onnx" / "littune_onnx.json").read_text())["image"]["exporter"] == "dynamo"
    text = ort.InferenceSession(str(tmp_path / "onnx" / "text.onnx"), providers=["CPUExecutionProvider"])
    for texts in (TEXTS[:1], TEXTS[:3], TEXTS):  # batch 1, 3, 5; each its own longest length
        tok = model.text_tower.tokenize(texts, padding="longest")
        got = text.run(None, {k: tok[k].long().numpy() for k in ("input_ids", "attention_mask")})[0]
        assert np.abs(got - model.encode_texts(texts).numpy()).max() <= 1e-5
    image = ort.InferenceSession(str(tmp_path / "onnx" / "image.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = model.encode_image(x).numpy()
    assert np.abs(image.run(None, {"pixels": x.numpy()})[0] - want).max() <= 1e-5
    assert _opset(tmp_path / "onnx" / "text.onnx") == 18


def test_the_default_torchscript_export_that_disagrees_falls_back_to_dynamo_in_one_line(monkeypatch, tmp_path,
                                                                                         capsys):
    monkeypatch.delenv("LITTUNE_ONNX_EXPORTER", raising=False)
    tower = build_image_tower({"type": "torch", "factory": "test_runtime:data_dependent",
                               "preprocess": {"size": 16, "resize": 16}})
    path = export_onnx(tower, tmp_path)
    assert json.loads(path.with_suffix(".json").read_text())["exporter"] == "dynamo" and _opset(path) == 18
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchscript exporter failed, exported with dynamo instead" in err[0]
    assert "disagrees with torch" in err[0]
    plain = export_onnx(build_image_tower(SPEC), tmp_path / "tiny")  # a tower TorchScript exports: no line
    assert json.loads(plain.with_suffix(".json").read_text())["exporter"] == "torchscript" and _opset(plain) == 17
    assert capsys.readouterr().err == ""


def test_a_named_exporter_is_never_replaced_and_a_wrong_name_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setenv("LITTUNE_ONNX_EXPORTER", "dynamo")
    with pytest.raises(LittuneError, match="needs onnxscript"):
        export_onnx(build_image_tower(SPEC), tmp_path)
    assert not (tmp_path / "tower.json").exists()
    monkeypatch.setenv("LITTUNE_ONNX_EXPORTER", "jit")
    with pytest.raises(LittuneError, match="LITTUNE_ONNX_EXPORTER='jit' is not an ONNX exporter"):
        export_onnx(build_image_tower(SPEC), tmp_path)


def test_the_cli_exporter_flag_chooses_dynamo_and_the_record_says_so(tmp_path, capsys):
    from littune.cli import main

    _model().save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), "--out", str(tmp_path / "onnx"), "--exporter", "dynamo"]) == 0
    record = json.loads((tmp_path / "onnx" / "littune_onnx.json").read_text())
    assert record["text"]["exporter"] == record["image"]["exporter"] == "dynamo"
    assert _opset(tmp_path / "onnx" / "text.onnx") == 18


def test_dynamo_exports_a_tower_that_leaves_torch_for_numpy_which_torchscript_freezes(tmp_path):
    tower = build_image_tower({"type": "torch", "factory": "test_runtime:data_dependent",
                               "preprocess": {"size": 16, "resize": 16}})
    with pytest.raises(LittuneError, match="disagrees with torch"):
        export_onnx(tower, tmp_path / "ts", exporter="torchscript")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 5
    got = ONNXRunner(export_onnx(tower, tmp_path / "dynamo", exporter="dynamo"))(x)
    assert np.abs(got - tower(x).detach().numpy()).max() <= 1e-5
