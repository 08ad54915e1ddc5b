"""`littune export --format onnx`: the model runs with onnxruntime, tokenizers, PIL and numpy alone.

The exported folder is used in a subprocess that never imports torch (checked at its end), with the
image preprocessing written again from littune_onnx.json in PIL + numpy; its embeddings must equal
littune's own (max abs difference <= 1e-4) on images and on texts in several scripts.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, TINY_TEXT
from PIL import Image

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from littune import LiTConfig, LiTModel  # noqa: E402
from littune.cli import main  # noqa: E402
from littune.data.decode import load_image  # noqa: E402

DATA = Path(__file__).parent / "data"
TEXTS = sorted(set(CAPTIONS)) + ["一只黑猫在垫子上", "Кошка на ковре", "🐱🐶🚌 emoji only",
                                 "a caption far longer than the context length allows " * 6, "x"]

# The exported folder in use, preprocessing from littune_onnx.json; no torch anywhere.
NO_TORCH = r'''
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps
from tokenizers import Tokenizer
args = json.loads(sys.argv[1]); d = args["dir"]
cfg = json.load(open(d + "/littune_onnx.json")); p = cfg["preprocess"]; s = p["size"]

def pixels(path):  # Preprocess.eval: shorter side to resize_to, centre crop, /255, -mean, /std
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size; scale = p["resize_to"] / min(w, h)
    nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling[p["interpolation"].upper()])
    left, top = (nw - s) // 2, (nh - s) // 2
    a = np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0
    a = (a - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))

run = lambda name, feed: ort.InferenceSession(d + "/" + name, providers=["CPUExecutionProvider"]).run(None, feed)[0]
x = np.stack([pixels(f) for f in args["images"]])
enc = Tokenizer.from_file(d + "/tokenizer.json").encode_batch(args["texts"])
ids = np.array([e.ids for e in enc], np.int64); mask = np.array([e.attention_mask for e in enc], np.int64)
np.savez(args["out"], pixels=x, image=run("image.onnx", {"pixels": x}),
         text=run("text.onnx", {"input_ids": ids, "attention_mask": mask}), ids=ids)
assert "torch" not in sys.modules, "the exported model needed torch"
print("ran without torch")
'''

# The README's ten-line zero-shot example, as a user would paste it.
README_EXAMPLE = '''\
import json, numpy as np, onnxruntime as ort, tokenizers
from PIL import Image
d = "runs/lu/onnx/"; cfg = json.load(open(d + "littune_onnx.json")); p = cfg["preprocess"]; s = p["size"]
im = Image.open("cat.jpg").convert("RGB"); k = p["resize_to"] / min(im.size)
im = im.resize((max(s, round(im.width * k)), max(s, round(im.height * k))), Image.Resampling[p["interpolation"].upper()])
l, t = (im.width - s) // 2, (im.height - s) // 2; im = np.asarray(im.crop((l, t, l + s, t + s)), np.float32) / 255
img = ort.InferenceSession(d + "image.onnx").run(None, {"pixels": ((im - np.float32(p["mean"])) / np.float32(p["std"])).transpose(2, 0, 1)[None]})[0]
labels = ["cat", "dog", "car"]; enc = tokenizers.Tokenizer.from_file(d + "tokenizer.json").encode_batch([f"a photo of a {c}" for c in labels])
txt = ort.InferenceSession(d + "text.onnx").run(None, {"input_ids": np.array([e.ids for e in enc]), "attention_mask": np.array([e.attention_mask for e in enc])})[0]
z = cfg["temperature"] * img[0] @ txt.T; print({c: round(float(q), 3) for c, q in zip(labels, np.exp(z - z.max()) / np.exp(z - z.max()).sum())})
'''


def _python(code: str, *argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def saved(tiny_model, tmp_path):
    """A tiny model (transformer text tower, tiny CNN image tower) saved and loaded as a user has it."""
    torch.manual_seed(0)
    model = tiny_model("Lu")
    model.save_pretrained(tmp_path / "model")
    return LiTModel.from_pretrained(tmp_path / "model"), tmp_path / "model"


def _images(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = [str(DATA / "chelsea.jpg"), str(DATA / "coffee.jpg")]
    for i, (w, h) in enumerate([(50, 40), (31, 77), (64, 64), (33, 32)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_exported_model_matches_littune_embeddings_without_torch(saved, tmp_path, one_thread, capsys):
    model, model_dir = saved
    out = tmp_path / "onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "image.onnx" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["image.onnx", "littune_onnx.json", "text.onnx", "tokenizer.json"]
    images = _images(tmp_path)
    args = {"dir": str(out), "images": images, "texts": TEXTS, "out": str(tmp_path / "got.npz")}
    assert "ran without torch" in _python(NO_TORCH, json.dumps(args))
    got = np.load(tmp_path / "got.npz")
    want_pixels = torch.stack([model.preprocess.eval(load_image(p)) for p in images]).numpy()
    np.testing.assert_array_equal(got["pixels"], want_pixels)  # the PIL + numpy preprocessing is littune's
    assert np.abs(got["image"] - model.encode_images(images).numpy()).max() <= 1e-4
    assert np.abs(got["text"] - model.encode_texts(TEXTS).numpy()).max() <= 1e-4
    assert got["ids"].shape == (len(TEXTS), model.text_tower.context_length)  # the long caption is cut
    cfg = json.loads((out / "littune_onnx.json").read_text())
    assert cfg["embed_dim"] == got["text"].shape[1] == model.config.embed_dim
    assert cfg["temperature"] == pytest.approx(float(model.logit_scale.detach().exp()))
    assert cfg["fingerprints"]["image_tower"] == model.image_fingerprint
    assert cfg["image_skipped"] is None and cfg["pad_id"] == model.text_tower.tokenizer.pad_token_id
    assert cfg["preprocess"]["jpeg"] == {"mode": "exact"}


def test_the_onnx_record_says_a_model_was_embedded_with_fast_jpeg_decoding():
    from littune.export.onnx import onnx_record
    from littune.towers.tiny import SPEC

    cfg = LiTConfig(setting="Lu", image_tower={**SPEC, "decode": "fast"}, text_tower=dict(TINY_TEXT), embed_dim=16)
    model = LiTModel.from_config(cfg, captions=CAPTIONS)
    jpeg = onnx_record(model, 0.0, {"image": None})["preprocess"]["jpeg"]
    assert jpeg["mode"] == "fast" and jpeg["draft_to"] == model.preprocess.resize_to and jpeg["reducing_gap"] == 3.0


def test_readme_zero_shot_example_gives_littunes_probabilities(saved, tmp_path, one_thread):
    model, model_dir = saved
    out = tmp_path / "onnx"
    assert main(["export", str(model_dir), "--out", str(out)]) == 0
    cat = DATA / "chelsea.jpg"
    code = README_EXAMPLE.replace("runs/lu/onnx/", f"{out}/").replace("cat.jpg", str(cat))
    probs = ast.literal_eval(_python(code + 'import sys; assert "torch" not in sys.modules\n').strip())
    labels = ["cat", "dog", "car"]
    want = model.label_probabilities(model.encode_images([cat]), model.encode_texts([f"a photo of a {c}" for c in labels]))
    assert list(probs) == labels
    np.testing.assert_allclose([probs[c] for c in labels], want[0].numpy(), atol=1e-3)
    assert len(README_EXAMPLE.splitlines()) == 10


def test_export_refuses_an_existing_folder_and_writes_nothing(saved, tmp_path, capsys):
    _, model_dir = saved
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["export", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert main(["export", str(model_dir), "--out", str(out), "--overwrite"]) == 2  # not an export: kept
    assert "not a littune ONNX export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"]  # no temporary folder left


def test_overwrite_replaces_an_earlier_export(saved, tmp_path):
    from littune.export.onnx import export_onnx_model

    model, _ = saved
    out = tmp_path / "onnx"
    first = export_onnx_model(model, out)
    (out / "stale.txt").write_text("from the first export")
    with torch.no_grad():
        model.text_head.weight.mul_(-1)
    second = export_onnx_model(model, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert second["fingerprints"]["text_embeddings"] != first["fingerprints"]["text_embeddings"]
    assert json.loads((out / "littune_onnx.json").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"]


class _Classifier(torch.nn.Module):
    """A tiny ViT-like classifier exported as users have one: its layer-normed tokens are the feature layer."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1))[:, 0])


def _classifier_onnx(path: Path, batch: str | None = "b") -> tuple[Path, str]:
    """The classifier as ``path`` (input ``input``, batch axis dynamic unless ``batch`` is None) and the
    name of its inner layer-norm output."""
    torch.manual_seed(0)
    axes = {"input": {0: batch}} if batch else None
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(_Classifier().eval(), (torch.randn(2 if batch else 1, 3, 32, 32),), str(path),
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes, dynamo=False)
    graph = onnx.load(str(path)).graph
    return path, [o for node in graph.node if node.name.startswith("/norm/") for o in node.output][-1]


def _onnx_tower_model(spec: dict, loss: str = "softmax"):
    spec = {**spec, "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}}
    config = LiTConfig(setting="Lu", image_tower=spec, text_tower=dict(TINY_TEXT), embed_dim=16, loss=loss)
    torch.manual_seed(0)
    return LiTModel.from_config(config, captions=CAPTIONS)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_an_onnx_tower_on_an_inner_output_joins_the_head_in_image_onnx_matching_littune_without_torch(
        pool, tmp_path, one_thread):
    path, inner = _classifier_onnx(tmp_path / "classifier.onnx")
    model = _onnx_tower_model({"type": "onnx", "path": str(path), "output": inner, "pooling": pool})
    out = tmp_path / "onnx"
    assert main(["export", "--format", "onnx", "--out", str(out), str(_saved(model, tmp_path))]) == 0
    record = json.loads((out / "littune_onnx.json").read_text())
    assert record["image_skipped"] is None and record["image"]["input"] == "pixels"
    domains = [o.domain for o in onnx.load(str(out / "image.onnx")).opset_import]
    assert len(domains) == len(set(domains))  # one opset per domain, as onnx.checker expects
    images = _images(tmp_path)
    args = {"dir": str(out), "images": images, "texts": TEXTS[:3], "out": str(tmp_path / "got.npz")}
    assert "ran without torch" in _python(NO_TORCH, json.dumps(args))
    got = np.load(tmp_path / "got.npz")
    assert got["image"].shape == (len(images), 16)
    assert np.abs(got["image"] - model.encode_images(images).numpy()).max() <= 1e-4
    assert np.abs(got["text"] - model.encode_texts(TEXTS[:3]).numpy()).max() <= 1e-4


def _saved(model, tmp_path: Path) -> Path:
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_an_onnx_tower_graph_fixed_at_batch_one_gives_the_text_side_only_and_says_why_and_a_sigmoid_model_its_bias(
        tmp_path, capsys):
    from littune.export.onnx import export_onnx_model

    path, _ = _classifier_onnx(tmp_path / "fixed.onnx", batch=None)
    model = _onnx_tower_model({"type": "onnx", "path": str(path)}, loss="sigmoid")
    record = export_onnx_model(model, tmp_path / "onnx")
    assert record["logit_bias"] == pytest.approx(float(model.logit_bias.detach()))
    assert record["image"] is None and "cannot export the image tower onnx:fixed.onnx" in record["image_skipped"]
    assert not (tmp_path / "onnx" / "image.onnx").exists() and (tmp_path / "onnx" / "text.onnx").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text side only" in err[0]
