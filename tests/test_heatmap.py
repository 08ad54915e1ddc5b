"""Zero-shot heat maps (littune.inference.heatmap): the "free map" claim checked exactly on real towers, the map's
geometry over the image, `littune classify --heatmap` and `POST /api/heatmap`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CAPTIONS, TINY_TEXT
from littune.cli import main
from littune.errors import LittuneError
from littune.inference.heatmap import cell_centre, heatmap, image_box, spatial_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"
LABELS = ["cat", "cup of coffee", "red square"]


def lit(tower, embed_dim: int = 16):
    from littune import LiTConfig, LiTModel

    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=tower, text_tower=dict(TINY_TEXT), embed_dim=embed_dim)
    return LiTModel.from_config(cfg, captions=CAPTIONS).eval()


@pytest.fixture(scope="module")
def tiny():
    from littune.towers.tiny import SPEC

    return lit(SPEC)


def test_tiny_tower_map_mean_is_the_image_embedding_before_normalisation(tiny):
    """A mean-pooled tower and a linear head: the head at each location, averaged, is the head of the pooled
    features -- the model's own image embedding before normalisation (to float rounding)."""
    x = torch.randn(3, 3, 32, 32)
    emb, sf = spatial_embeddings(tiny, x)
    with torch.no_grad():
        ref = tiny.image_head(tiny.image_features(x))
    assert emb.shape == (3, 4, 4, 16) and sf.exact and sf.grid == (4, 4)
    assert torch.allclose(emb.mean(dim=(1, 2)), ref, atol=1e-6, rtol=0)
    assert torch.equal(sf.pooled, tiny.image_tower(x))  # the tower's own output, from the same pass
    # and its normalised mean is what encode_images gives for an image (the runtime path)
    hm = tiny.heatmap(DATA / "chelsea.jpg", LABELS)
    assert hm.maps.shape == (3, 4, 4) and hm.shape == (4, 4) and hm.exact
    pixels = tiny.preprocess.eval(Image.open(DATA / "chelsea.jpg").convert("RGB"))[None]
    emb, _ = spatial_embeddings(tiny, pixels)
    image = F.normalize(emb.mean(dim=(1, 2)), dim=-1)
    assert torch.allclose(image, tiny.encode_images(DATA / "chelsea.jpg"), atol=1e-5)
    text = tiny.zeroshot_weights(LABELS, "none")
    cos = torch.einsum("hwd,td->thw", F.normalize(emb[0], dim=-1), text)
    assert np.allclose(hm.maps, cos.numpy(), atol=1e-6)
    assert np.allclose(hm.pooled, (image @ text.T)[0].numpy(), atol=1e-5)
    assert np.allclose(hm.probabilities, tiny.classify(DATA / "chelsea.jpg", LABELS, templates="none")[0], atol=1e-4)


def _tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        '{"size": {"height": 32, "width": 32}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}')
    return folder


def test_vit_patch_tokens_are_exact_for_mean_pooling_and_flagged_approximate_for_cls(tmp_path):
    _tiny_vit(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    mean, cls = lit(f"hf:{tmp_path}#mean"), lit(f"hf:{tmp_path}")
    emb, sf = spatial_embeddings(mean, x)
    with torch.no_grad():
        ref = mean.image_head(mean.image_features(x))
    assert emb.shape == (2, 4, 4, 16) and sf.exact and "exact" in sf.how
    assert torch.allclose(emb.mean(dim=(1, 2)), ref, atol=1e-5)
    emb, sf = spatial_embeddings(cls, x)
    assert emb.shape == (2, 4, 4, 16) and not sf.exact and "approximate" in sf.how
    with torch.no_grad():
        assert torch.equal(sf.pooled, cls.image_tower(x))  # the CLS token, from the same pass
    assert not cls.heatmap(DATA / "coffee.jpg", LABELS).exact


def test_a_tower_without_a_map_is_a_one_line_error():
    model = lit({"type": "torch", "factory": "torch.nn:Flatten", "preprocess": {"size": 8, "resize": 8}})
    with pytest.raises(LittuneError, match=r"torch\.nn:Flatten.*not a map") as e:
        model.heatmap(DATA / "coffee.jpg", ["cat"])
    assert "\n" not in str(e.value)


def test_a_model_trained_from_a_cache_says_to_load_its_folder(tiny):
    from littune import LiTModel
    from littune.towers.image import CachedFeaturesTower

    t = tiny.image_tower
    model = LiTModel(tiny.config, CachedFeaturesTower(t.spec, t.fingerprint(), t.dim, t.preprocess), tiny.text_tower)
    with pytest.raises(LittuneError, match=r"was not loaded .* littune\.load\(\) to draw heat maps"):
        model.heatmap(DATA / "coffee.jpg", ["cat"])


def test_map_geometry_over_a_wide_image(tiny):
    """A 2:1 image: the map covers its centre square; the box puts the image's edges a map-width beyond."""
    img = Image.new("RGB", (128, 64), (200, 30, 30))
    hm = tiny.heatmap(img, ["cat"])
    assert hm.crop == pytest.approx((32, 0, 96, 64)) and hm.image_size == (128, 64)
    assert hm.box == pytest.approx((-2, 0, 6, 4))  # 4 x 4 cells over the 64 x 64 centre
    heat = np.zeros((4, 4))
    heat[1, 3] = 1
    assert cell_centre(heat, hm.crop) == pytest.approx((32 + 3.5 * 16, 1.5 * 16))
    assert image_box((0, 0, 10, 10), (10, 10), (7, 7)) == pytest.approx((0, 0, 7, 7))


def test_eval_box_is_the_area_the_eval_view_keeps():
    from littune.data.preprocess import Preprocess

    ramp = np.linspace(0, 255, 300)[None].repeat(150, 0)
    wide = Image.fromarray(np.stack([ramp] * 3, -1).astype(np.uint8))  # a ramp along the long side
    for img in (wide, wide.transpose(Image.Transpose.ROTATE_90)):
        for pre in (Preprocess(size=224), Preprocess(size=32, resize=32), Preprocess(size=64, resize=80)):
            box = pre.eval_box(*img.size)
            kept = np.asarray(pre.eval_uint8(img).permute(1, 2, 0), dtype=np.float64)
            size, bicubic = (pre.size, pre.size), Image.Resampling.BICUBIC
            boxed = np.asarray(img.resize(size, bicubic, box=box), dtype=np.float64)
            assert np.abs(kept - boxed).mean() < 1.0, (pre, box)
            dx, dy = (8, 0) if img.width > img.height else (0, 8)
            off = np.asarray(img.resize(size, bicubic, box=(box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)),
                             dtype=np.float64)
            assert np.abs(kept - off).mean() > 3.0  # the check can tell a box 8 px off


# -- classify --heatmap ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return tiny.save_pretrained(tmp_path_factory.mktemp("hm") / "model")


def test_classify_heatmap_writes_a_figure_per_image(saved, tmp_path, capsys):
    one = tmp_path / "one.png"
    assert main(["classify", "--model", str(saved), str(DATA / "chelsea.jpg"), "--labels", ",".join(LABELS),
                 "--heatmap", str(one), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["heatmap"] == str(one)
    with Image.open(one) as im:
        assert im.format == "PNG" and im.width > 600  # the image and three label panels
    code = main(["classify", "--model", str(saved), str(DATA / "chelsea.jpg"), str(tmp_path / "missing.jpg"),
                 str(DATA / "coffee.jpg"), "--labels", "cat,dog", "--heatmap", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert code == 1 and sorted(p.name for p in tmp_path.glob("m-*.png")) == ["m-1.png", "m-3.png"]
    assert "heat maps drawn to" in err and "m-3.png" in err


def test_classify_heatmap_without_matplotlib_is_one_line(saved, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["classify", "--model", str(saved), str(DATA / "chelsea.jpg"), "--labels", "cat",
                 "--heatmap", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "littune classify: error: --heatmap needs matplotlib: pip install 'littune[plot]'"
    assert not (tmp_path / "x.png").exists()


# -- POST /api/heatmap ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(saved):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from littune import LiTModel
    from littune.serve.app import create_app

    app = create_app(LiTModel.from_pretrained(saved), model_name="tiny", max_upload_bytes=200_000,
                     max_pixels=1_000_000, max_prompts=50)
    with TestClient(app, base_url="http://localhost:8000") as c:
        yield c


def post(client, data: bytes, labels: str = ", ".join(LABELS), **form):
    return client.post("/api/heatmap", files={"image": ("x.jpg", data, "image/jpeg")}, data={"labels": labels, **form})


def test_api_heatmap_answers_the_maps_of_the_model(client, saved):
    from littune import LiTModel

    data = (DATA / "coffee.jpg").read_bytes()
    r = post(client, data, templates="none")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [4, 4] and body["exact"] is True and [x["label"] for x in body["labels"]] == LABELS
    maps = np.array([x["map"] for x in body["labels"]])
    assert maps.shape == (3, 4, 4)
    hm = LiTModel.from_pretrained(saved).heatmap(Image.open(io.BytesIO(data)), LABELS)
    assert np.allclose(maps, hm.maps, atol=1e-4)
    assert body["crop"] == pytest.approx(list(hm.crop), abs=1e-3)
    assert body["image"] == dict(zip(("width", "height"), hm.image_size))
    assert hm.image_size == Image.open(DATA / "coffee.jpg").size
    assert sum(x["probability"] for x in body["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert body["range"] == pytest.approx([hm.maps.min(), hm.maps.max()], abs=1e-6)


@pytest.mark.parametrize("labels, form, status, words", [
    ("", {}, 422, "no labels"), ("cat, dog, cat", {}, 422, "given twice"),
    (",".join(f"l{i}" for i in range(101)), {}, 422, "too many labels"),
    ("a, b, c, d, e, f, g, h, i", {"templates": "imagenet7"}, 422, "too many prompts"),
    ("cat", {"templates": "../../etc/passwd"}, 400, "unknown template set")])
def test_api_heatmap_refuses_bad_labels_and_templates(client, labels, form, status, words):
    r = post(client, (DATA / "coffee.jpg").read_bytes(), labels, **form)
    assert r.status_code == status and words in r.json()["detail"]


def test_api_heatmap_refuses_bad_images(client):
    assert post(client, b"\xff\xd8\xff" + b"\0" * 210_000).status_code == 413
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, format="PNG")
    r = post(client, big.getvalue())
    assert r.status_code == 413 and "too many pixels" in r.json()["detail"]
    r = post(client, b"just some text\n" * 10)
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    assert client.post("/api/heatmap", data={"labels": "cat"}).status_code == 422
    assert post(client, (DATA / "coffee.jpg").read_bytes(), "cat").status_code == 200  # still serving


def test_api_heatmap_query_is_one_text_commas_and_all(client, saved):
    """``query`` instead of ``labels``: one map for the whole text (a comma does not split it), the model's own."""
    from littune import LiTModel

    data = (DATA / "coffee.jpg").read_bytes()
    text = "a cup of coffee, seen from above"
    r = post(client, data, "", query=f"  {text} ", templates="none")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["label"] for x in body["labels"]] == [text] and body["labels"][0]["probability"] == pytest.approx(1)
    hm = LiTModel.from_pretrained(saved).heatmap(Image.open(io.BytesIO(data)), [text])
    assert np.allclose(np.array(body["labels"][0]["map"]), hm.maps[0], atol=1e-4)


@pytest.mark.parametrize("labels, query, words", [
    ("cat", "a cat", "give labels or a query, not both"), ("", "x" * 201, "the query is 201 characters long")])
def test_api_heatmap_refuses_a_query_with_labels_or_too_long(client, labels, query, words):
    r = post(client, (DATA / "coffee.jpg").read_bytes(), labels, query=query)
    assert r.status_code == 422 and r.json()["detail"] == words + ("" if labels else ", at most 200")


def test_api_heatmap_of_a_tower_without_a_map_is_a_one_line_400():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from littune.serve.app import create_app

    model = lit({"type": "torch", "factory": "torch.nn:Flatten", "preprocess": {"size": 8, "resize": 8}})
    with TestClient(create_app(model), base_url="http://localhost:8000") as c:
        r = post(c, (DATA / "coffee.jpg").read_bytes(), "cat")
    detail = r.json()["detail"]
    assert r.status_code == 400 and detail.startswith("this model draws no heat maps: torch:torch.nn:Flatten")
    assert "not a map" in detail and "\n" not in detail
