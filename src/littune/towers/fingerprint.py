"""A locked image tower's fingerprint from its spec and weights file, without building the tower.

The trainer checks that an embedding cache comes from the configured tower by comparing
fingerprints (``name|w=<weights hash>|p=<preprocessing hash>``, see
:meth:`~littune.towers.image.ImageTower.fingerprint`). For the towers whose weights live in a file
the fingerprint is computed here from that file, so training from a cache never runs or
allocates the image model:

* ``efficientnet-lite`` -- the state dict in the weights package's file (ImageNet classifier left out),
* ``onnx`` -- the bytes of the ``.onnx`` file (and, in the name, the output read and its pooling).

:func:`fingerprint_from_spec` returns None for the others, and the caller builds the tower to ask
it: a ``torch`` factory tower's weights are whatever the factory returns, a ``timm`` tower's are
what ``timm.create_model`` downloads (or initialises), and a Hugging Face
model's state dict is what ``from_pretrained`` makes of the folder or hub id (transformers renames
stored keys as it loads, and initialises weights the folder lacks). It returns None too where building
would fail (a missing package or file), so that the build reports the error. The result equals the
built tower's ``fingerprint()`` (tests/test_towers.py checks both kinds).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..hashing import hash_file, hash_state_dict, hash_text
from ..data.preprocess import Preprocess
from .image import EFFICIENTNET_LITE, parse_image_tower, with_decode
from .onnx import ONNX_POOLING, onnx_tower_name


def fingerprint_from_spec(spec: str | dict) -> str | None:
    """The fingerprint the (pre-trained) tower built from ``spec`` would report, or None if only it knows."""
    spec = parse_image_tower(spec)
    kind = spec.get("type")
    if kind == "efficientnet-lite":
        return _efficientnet(spec)
    if kind == "onnx":
        return _onnx(spec)
    return None


def tower_fingerprint(spec: dict, tower=None) -> str:
    """The configured tower's fingerprint: from its weights file where possible, else from ``tower``
    (or a tower built for the purpose, on the CPU, and freed)."""
    found = fingerprint_from_spec(spec)
    if found is not None:
        return found
    from .image import build_image_tower

    return (tower if tower is not None else build_image_tower(spec)).fingerprint()


def _format(name: str, weights_hash: str, preprocess: Preprocess) -> str:
    return f"{name}|w={weights_hash[:16]}|p={hash_text(preprocess.key())[:8]}"


def _efficientnet(spec: dict) -> str | None:
    name = spec.get("name", "efficientnet-lite0")
    if name not in EFFICIENTNET_LITE:
        return None
    size, package, attr = EFFICIENTNET_LITE[name]
    size = int(spec.get("image_size") or size)
    if size < 32:
        return None  # building it gives the error
    try:
        path = getattr(importlib.import_module(package), attr).get_model_file_path()
    except ImportError:
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The tower holds the network as ``net`` with its classifier replaced by an identity.
    state = {f"net.{k}": v for k, v in state.items() if not k.startswith("_fc.")}
    return _format(name, hash_state_dict(state),
                   with_decode(Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), spec))


def _onnx(spec: dict) -> str | None:
    path = Path(spec["path"])
    output, pooling = spec.get("output", 0), spec.get("pooling", "cls")
    if not path.is_file() or pooling not in ONNX_POOLING:
        return None
    output = int(output) if str(output).isdigit() else str(output)
    return _format(onnx_tower_name(path, output, pooling), hash_file(path),
                   with_decode(Preprocess.from_dict(spec.get("preprocess") or {}), spec))
