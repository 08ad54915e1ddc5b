"""`littune tower cut`: a node output of a larger ONNX graph becomes an onnx: tower of its own."""

import json

import numpy as np
import pytest
import torch

from littune.cli import main
from littune.errors import LittuneError
from littune.towers.cut import read_spec
from littune.towers.image import build_image_tower

from token_net import exported

PRE = {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture
def graph(tmp_path):
    return exported(tmp_path / "saliency.onnx", saliency=True, input_name="input_image", output_name="importance")


def test_cut_graph_is_the_feature_layer_alone_and_matches_the_full_graph(graph, tmp_path, capsys):
    import onnx

    net, path, inner = graph
    out = tmp_path / "towers" / "backbone.onnx"
    assert main(["tower", "cut", str(path), "--output", inner, "--out", str(out), "--size", "32",
                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]) == 0
    assert "backbone.tower.json" in capsys.readouterr().out
    cut = onnx.load(str(out))
    assert [o.name for o in cut.graph.output] == [inner] and [i.name for i in cut.graph.input] == ["input_image"]
    assert not any(n.op_type == "Sigmoid" for n in cut.graph.node)  # the head is gone
    written = json.loads((tmp_path / "towers" / "backbone.tower.json").read_text())
    assert written["path"] == "backbone.onnx" and written["relative"]  # beside the spec: the folder may move
    spec = read_spec(tmp_path / "towers" / "backbone.tower.json")
    assert spec["path"] == str(out.resolve()) and spec["pooling"] == "cls" and spec["preprocess"]["size"] == 32
    tower = build_image_tower(spec)
    full = build_image_tower({"type": "onnx", "path": str(path), "output": inner, "preprocess": PRE})
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = net.features(x)[:, 0]
    assert tower(x).shape == (3, 16) and tower.dim == 16
    assert (tower(x) - want).abs().max() < 1e-5
    assert np.array_equal(tower(x).numpy(), full(x).numpy())
    assert tower.preprocess.size == 32 and tower.preprocess.std == (0.25, 0.25, 0.25)


def test_default_preprocessing_spec_keeps_the_plain_onnx_name_fingerprint(graph, tmp_path):
    _, path, inner = graph
    out = tmp_path / "backbone.onnx"
    assert main(["tower", "cut", str(path), "--output", inner, "--out", str(out)]) == 0
    spec = read_spec(tmp_path / "backbone.tower.json")
    assert build_image_tower(spec).fingerprint() == build_image_tower(f"onnx:{out}").fingerprint()
    mean = tmp_path / "mean.onnx"
    assert main(["tower", "cut", str(path), "--output", inner, "--out", str(mean), "--pool", "mean"]) == 0
    assert json.loads((tmp_path / "mean.tower.json").read_text())["pooling"] == "mean"


def test_a_cut_tower_folder_that_moves_still_embeds_with_the_same_fingerprint(graph, tmp_path):
    import shutil

    from littune.commands.embed import _tower_spec

    _, path, inner = graph
    out = tmp_path / "towers" / "backbone.onnx"
    assert main(["tower", "cut", str(path), "--output", inner, "--out", str(out)]) == 0
    before = build_image_tower(_tower_spec(str(tmp_path / "towers" / "backbone.tower.json"))).fingerprint()
    shutil.move(tmp_path / "towers", tmp_path / "moved")
    spec = _tower_spec(str(tmp_path / "moved" / "backbone.tower.json"))  # how --tower FILE.tower.json reads it
    assert spec["path"] == str((tmp_path / "moved" / "backbone.onnx").resolve())
    assert build_image_tower(spec).fingerprint() == before


def test_output_not_in_the_graph_is_one_line_naming_close_outputs_and_writes_nothing(graph, tmp_path, capsys):
    _, path, inner = graph
    out = tmp_path / "backbone.onnx"
    assert main(["tower", "cut", str(path), "--output", inner + "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no output" in err and inner in err
    assert list(tmp_path.iterdir()) == [path]


def test_existing_out_or_spec_is_refused_and_left_as_it_was(graph, tmp_path):
    from littune.towers.cut import cut_onnx

    _, path, inner = graph
    out = tmp_path / "backbone.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(LittuneError, match="exists"):
        cut_onnx(path, inner, out)
    assert out.read_bytes() == b"mine" and not (tmp_path / "backbone.tower.json").exists()
    other = tmp_path / "other.onnx"
    (tmp_path / "other.tower.json").write_text("{}")
    with pytest.raises(LittuneError, match="other.tower.json exists"):
        cut_onnx(path, inner, other)
    assert not other.exists() and (tmp_path / "other.tower.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.onnx", "other.tower.json", "saliency.onnx"]
