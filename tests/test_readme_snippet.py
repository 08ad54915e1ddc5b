"""The README's ONNX zero-shot snippet, run as written, gives `littune classify`'s probabilities on
transparent PNGs (clip art, emoji): littune composites alpha on white, so must the snippet.

The code block is read from README.md (the python block after the line "It runs with onnxruntime, numpy,
Pillow and `tokenizers` alone"); only its two paths -- the export folder and the image -- are pointed at a
tiny model's export and at PNGs made here, whose colour under the transparent pixels is not white.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from littune.cli import main  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "It runs with onnxruntime, numpy, Pillow and `tokenizers` alone"
LABELS = ["cat", "dog", "car"]


def readme_snippet() -> str:
    """The first ```python block after the marker line of README.md."""
    text = README.read_text(encoding="utf-8")
    at = text.find(MARKER)
    assert at >= 0, f"README.md has no line {MARKER!r}"
    found = re.search(r"^```python\n(.*?)^```", text[at:], re.S | re.M)
    assert found, f"no ```python block after {MARKER!r} in README.md"
    return found.group(1)


def pointed_at(code: str, folder: Path, image: Path) -> str:
    """``code`` with its export folder (``d = "..."``) and image (``Image.open("...")``) replaced."""
    code, n_dir = re.subn(r'\bd = "[^"]*"', lambda _: f"d = {json.dumps(str(folder) + '/')}", code)
    code, n_img = re.subn(r'Image\.open\("[^"]*"\)', lambda _: f"Image.open({json.dumps(str(image))})", code)
    assert (n_dir, n_img) == (1, 1), "the snippet names its folder as d = \"...\" and opens one image"
    return code


def transparent_pngs(root: Path) -> dict[str, Path]:
    """A red disc on a transparent ground whose hidden colour is dark blue noise: RGBA, LA and a palette
    image with a transparent index (tRNS)."""
    rng = np.random.default_rng(0)
    h, w = 48, 60
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < 15 ** 2
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 2] = rng.integers(60, 140, (h, w))
    rgb[disc] = (220, 30, 30)
    alpha = np.where(disc, 255, 0).astype(np.uint8)
    alpha[:, :8] = 128  # a half-transparent band
    out = {"RGBA": root / "rgba.png", "LA": root / "la.png", "P": root / "palette.png"}
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(out["RGBA"])
    Image.fromarray(np.dstack([rgb[..., 2], alpha]), "LA").save(out["LA"])
    pal = Image.fromarray(np.where(disc, 1, 0).astype(np.uint8), "P")
    pal.putpalette([20, 20, 120, 220, 30, 30] + [0] * 762)
    pal.save(out["P"], transparency=0)  # index 0 (the dark blue ground) is transparent
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model's folder, its ONNX export, and a template file holding the snippet's prompt."""
    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    root = tmp_path_factory.mktemp("snippet")
    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
    LiTModel.from_config(cfg, captions=CAPTIONS).save_pretrained(root / "model")
    assert main(["export", str(root / "model"), "--format", "onnx", "--out", str(root / "onnx")]) == 0
    (root / "photo.txt").write_text("a photo of a {}\n")
    return root


def _classify(root: Path, image: Path, capsys) -> dict[str, float]:
    capsys.readouterr()
    assert main(["classify", "--model", str(root / "model"), str(image), "--labels", ",".join(LABELS),
                 "--templates", str(root / "photo.txt"), "--top", "0", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    return {r["label"]: r["probability"] for r in result["labels"]}


def _snippet(folder: Path, image: Path, cwd: Path) -> dict[str, float]:
    code = pointed_at(readme_snippet(), folder, image)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_readme_onnx_snippet_gives_littune_classify_probabilities_on_a_transparent_png(exported, mode, tmp_path,
                                                                                        capsys):
    from littune import LiTModel

    image = transparent_pngs(tmp_path)[mode]
    want = _classify(exported, image, capsys)
    # the image tells compositing apart: with the hidden colour kept, littune's model says otherwise
    model = LiTModel.from_pretrained(exported / "model")
    kept = Image.fromarray(np.asarray(Image.open(image).convert("RGB")))  # the pixels alone, no transparency left
    other = model.classify([kept], LABELS, templates=["a photo of a {}"])[0].numpy()
    assert np.abs(other - np.array([want[c] for c in LABELS])).max() > 1e-3
    got = _snippet(exported / "onnx", image, tmp_path)
    assert list(got) == LABELS
    for c in LABELS:
        assert abs(got[c] - want[c]) <= 1e-4, (mode, got, want)


def test_readme_onnx_snippet_gives_littune_classify_probabilities_on_a_photo(exported, tmp_path, capsys):
    photo = Path(__file__).parent / "data" / "chelsea.jpg"
    want, got = _classify(exported, photo, capsys), _snippet(exported / "onnx", photo, tmp_path)
    assert list(got) == LABELS and max(abs(got[c] - want[c]) for c in LABELS) <= 1e-4, (got, want)
