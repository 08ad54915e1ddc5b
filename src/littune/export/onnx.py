"""The model out: a trained model as ONNX graphs that run with onnxruntime and ``tokenizers`` alone.

:func:`export_onnx_model` writes a folder that needs neither torch nor littune to use:

* ``text.onnx`` -- ``input_ids`` and ``attention_mask`` (int64, ``(batch, sequence)``, both axes
  dynamic) to ``text_embeddings`` ``(batch, D)``: the text tower, the text head, L2 normalisation;
* ``image.onnx`` -- ``pixels`` (float32 ``(batch, 3, S, S)``, the batch axis dynamic) to
  ``image_embeddings`` ``(batch, D)``: the image tower, the image head, L2 normalisation (an
  ``onnx:`` tower's own graph joined to the head, :mod:`littune.export.onnx_join`). A tower that does not
  export (an operator the exporter lacks, a graph that disagrees with littune) leaves the text side
  only; one line and ``image_skipped`` in the JSON say why;
* ``tokenizer.json`` -- the text tower's Hugging Face ``tokenizers`` tokenizer, with littune's
  truncation (at the context length) and padding (to the batch's longest text) built in, so
  ``Tokenizer.from_file(...).encode_batch(texts)`` gives exactly the ids littune feeds the tower
  (a text tower's ``prefix`` too: its normaliser puts it before every text);
* ``littune_onnx.json`` -- the image preprocessing (:meth:`~littune.data.preprocess.Preprocess.eval`:
  shorter side resized to ``resize_to`` with ``interpolation``, centre crop ``size``, ``/255``,
  minus ``mean``, over ``std``; ``jpeg``: ``exact``, or the fast JPEG decoding the model was embedded
  with), the temperature (``exp(logit_scale)``), the sigmoid loss's logit
  bias, the embedding size, the context length, the pad id, ``text_prefix`` (the prefix the
  tokenizer puts before every text, for the record: do not add it again; null: none), littune's
  version and the model's fingerprints (the text side's covers the tokenizer, prefix included).

Each graph is exported as :mod:`littune.towers.runtime` exports locked towers (``torch.onnx.export``: the
TorchScript exporter unless ``exporter`` or ``$LITTUNE_ONNX_EXPORTER`` says ``dynamo``, dynamo as the
fallback, :mod:`littune.towers.exporters`; its warnings silenced; ``text.exporter`` and ``image.exporter`` in
``littune_onnx.json`` name the exporter that wrote each graph, ``opset`` 18 for dynamo's, 17 for TorchScript's) and compared with littune's own embeddings right after
(torch; an ``onnx:`` tower through its onnxruntime session), on inputs of two batch sizes (and, for text, two sequence lengths); an export that disagrees is refused. The folder
is written beside ``out`` under a temporary name and renamed into place, so a failed export leaves
nothing; a folder that exists already is an error unless ``overwrite`` (which replaces only an
earlier export, or an empty folder).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LittuneError
from ..fileio import replace_dir as move_into_place
from ..fileio import write_json
from ..towers.exporters import with_fallback
from ..towers.runtime import EXPORT_TOLERANCE, first_line, onnx_bytes

FORMAT = "littune-onnx"
FORMAT_VERSION = 1
TEXT_NAME, IMAGE_NAME = "text.onnx", "image.onnx"
TOKENIZER_NAME, META_NAME = "tokenizer.json", "littune_onnx.json"
#: texts the exported tokenizer is checked on against littune's own (several scripts, one too long)
CHECK_TEXTS = ["a photo of a cat", "ein roter Apfel", "猫が好きです", "قطة سوداء", "🍎 emoji 🐱",
               "a very long caption " * 40]


class _TextGraph(nn.Module):
    """Token ids and mask -> L2-normalised text embeddings (what ``LiTModel.encode_text`` computes)."""

    def __init__(self, model):
        super().__init__()
        self.tower, self.head = model.text_tower, model.text_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.tower(input_ids, attention_mask)), dim=-1)


class _ImageGraph(nn.Module):
    """Pixels -> L2-normalised image embeddings (what ``LiTModel.encode_image`` computes); the attention
    head reads the tower's map, flattened to tokens (:func:`littune.model.heads.tower_tokens`)."""

    def __init__(self, model):
        from ..model.heads import reads_tokens

        super().__init__()
        self.tower, self.head, self.tokens = model.image_tower, model.image_head, reads_tokens(model)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..model.heads import tower_tokens

        features = tower_tokens(self.tower, pixels, self.head.grid) if self.tokens else self.tower(pixels)
        return F.normalize(self.head(features), dim=-1)


# -- one graph: export, then check against torch -------------------------------------------------
def _export(module: nn.Module, example: tuple, path: Path, inputs: list[str], output: str, axes: dict,
            exporter: str) -> None:
    """``module`` on ``example`` as an ONNX file (:func:`littune.towers.exporters.onnx_bytes`)."""
    path.write_bytes(onnx_bytes(module, example, inputs, output, axes, exporter=exporter))


def _max_diff(module: nn.Module, path: Path, feeds: list[dict[str, torch.Tensor]]) -> float:
    """Largest |ONNX - torch| over the input batches ``feeds`` (inf if a shape differs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in feeds:
        with torch.inference_mode():
            want = module(*feed.values()).float().numpy()
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        if got.shape != want.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def _export_checked(module: nn.Module, path: Path, feeds: list[dict], output: str, axes: dict, what: str,
                    exporter: str | None = None) -> tuple[float, str]:
    """Export ``module`` to ``path`` and check it on ``feeds``: ``(largest difference, exporter used)``
    (:func:`littune.towers.exporters.with_fallback`).

    ``module`` must be in eval mode: the exporter gives it back in the mode it found it, children too."""
    return with_fallback(lambda name: _checked(module, path, feeds, what, lambda: _export(
        module, tuple(feeds[0].values()), path, list(feeds[0]), output, axes, name)), f"the {what}", exporter)


def _checked(module: nn.Module, path: Path, feeds: list[dict], what: str, write) -> float:
    """``write()`` the graph of ``module`` to ``path``, then check it on ``feeds`` (one line if either fails)."""
    try:
        write()
        err = _max_diff(module, path, feeds)
    except LittuneError:
        raise
    except Exception as e:  # the exporter's errors are many and long: keep the first line
        raise LittuneError(f"cannot export the {what} to ONNX ({first_line(e)})") from None
    if not err <= EXPORT_TOLERANCE:
        raise LittuneError(f"the ONNX export of the {what} disagrees with torch (max abs difference {err:.2g})")
    return err


def export_text(model, path: Path, exporter: str | None = None) -> tuple[float, str]:
    """``text.onnx``: the text tower, head and normalisation; checked at two batch and sequence sizes.
    Returns ``(largest difference, exporter used)``."""
    tower = model.text_tower
    short = tower.tokenize(CHECK_TEXTS[:2], padding="longest")
    full = tower.tokenize(CHECK_TEXTS, padding="max_length")
    feeds = [{k: short[k].long() for k in ("input_ids", "attention_mask")},
             {k: full[k].long() for k in ("input_ids", "attention_mask")}]
    seq = {0: "batch", 1: "sequence"}
    axes = {"input_ids": seq, "attention_mask": seq, "text_embeddings": {0: "batch"}}
    return _export_checked(_TextGraph(model).eval(), path, feeds, "text_embeddings", axes, "text tower", exporter)


def export_image(model, path: Path, exporter: str | None = None) -> tuple[float, str]:
    """``image.onnx``: the image tower, head and normalisation; checked at batch sizes 2 and 3; returns
    ``(largest difference, exporter used)``.

    An ``onnx:`` tower's own graph is joined to the rest (:mod:`littune.export.onnx_join`)."""
    from .onnx_join import joined_image_graph
    from ..towers.onnx import ONNXTower

    size = model.preprocess.size
    gen = torch.Generator().manual_seed(0)
    feeds = [{"pixels": torch.randn(n, 3, size, size, generator=gen)} for n in (2, 3)]
    module, what = _ImageGraph(model).eval(), f"image tower {model.image_tower.name}"
    if isinstance(model.image_tower, ONNXTower):
        if module.tokens:
            raise LittuneError(f"{what}: an onnx: tower's graph gives pooled features, and the attention image "
                               "head reads the tower's map")
        return with_fallback(lambda name: _checked(module, path, feeds, what, lambda: path.write_bytes(
            joined_image_graph(model, name))), f"the {what}", exporter)
    axes = {"pixels": {0: "batch"}, "image_embeddings": {0: "batch"}}
    return _export_checked(module, path, feeds, "image_embeddings", axes, what, exporter)


# -- the tokenizer and the record ----------------------------------------------------------------
def export_tokenizer(model, path: Path) -> None:
    """``tokenizer.json`` with littune's truncation and padding, checked against littune's ids."""
    from tokenizers import Tokenizer

    hf = model.text_tower.tokenizer
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.enable_truncation(max_length=model.text_tower.context_length, direction=hf.truncation_side)
    tok.enable_padding(direction=hf.padding_side, pad_id=hf.pad_token_id, pad_token=hf.pad_token)
    got = [e.ids for e in tok.encode_batch(CHECK_TEXTS)]
    want = model.text_tower.tokenize(CHECK_TEXTS, padding="longest")["input_ids"].tolist()
    if got != want:
        raise LittuneError("the text tower's tokenizer does not export: the `tokenizers` copy gives other ids")
    path.write_text(tok.to_str(pretty=True), encoding="utf-8")


def _fingerprints(model) -> dict:
    """The image tower's (keys the embedding cache), the image embeddings' (keys an index) and the
    text embeddings' (text tower, text head, tokenizer)."""
    import hashlib

    from ..hashing import hash_state_dict
    from ..search.index import embedding_fingerprint

    h = hashlib.sha256()
    for part in (model.text_tower, model.text_head):
        h.update(f"{hash_state_dict(part.state_dict())}|".encode())
    h.update(model.text_tower.tokenizer.backend_tokenizer.to_str().encode())
    return {"image_tower": model.image_fingerprint, "image_embeddings": embedding_fingerprint(model),
            "text_embeddings": "txt-" + h.hexdigest()[:24]}


def onnx_record(model, text_err: float, image: dict, text_exporter: str | None = None) -> dict:
    """What ``littune_onnx.json`` holds (see the module docstring); ``text_exporter``: the exporter that
    wrote ``text.onnx`` (``image``'s record names its own)."""
    from .. import __version__

    p = model.preprocess
    tok = model.text_tower.tokenizer
    bias = model.logit_bias
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "littune": __version__,
        "setting": model.config.setting, "loss": model.config.loss, "embed_dim": int(model.config.embed_dim),
        "text": {"file": TEXT_NAME, "inputs": ["input_ids", "attention_mask"], "output": "text_embeddings",
                 "max_abs_diff": text_err, "exporter": text_exporter},
        **image,
        "tokenizer": TOKENIZER_NAME, "context_length": int(model.text_tower.context_length),
        "pad_id": int(tok.pad_token_id), "padding_side": tok.padding_side,
        "text_prefix": model.text_tower.prefix,
        "preprocess": {"size": p.size, "resize_to": p.resize_to, "interpolation": p.interpolation,
                       "mean": list(p.mean), "std": list(p.std), "crop": "center",
                       "decode": "EXIF orientation applied, RGB, alpha composited on white", "jpeg": _jpeg(p)},
        "logit_scale": float(model.logit_scale.detach()),
        "temperature": float(model.logit_scale.detach().exp()),
        "logit_bias": None if bias is None else float(bias.detach()),
        "fingerprints": _fingerprints(model),
    }


def _jpeg(p) -> dict:
    """How the model's images were decoded from JPEG: ``exact``, or ``fast`` with its draft size and gap."""
    from ..data.preprocess import REDUCING_GAP

    if p.decode != "fast":
        return {"mode": "exact"}
    return {"mode": "fast", "draft_to": p.draft_to, "reducing_gap": REDUCING_GAP,
            "how": "decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side is >= draft_to, "
                   "then resized with Pillow's reducing_gap"}


# -- the folder ------------------------------------------------------------------------------------
def check_out(out: Path, overwrite: bool, marker: str = META_NAME, what: str = "ONNX export") -> None:
    """Refuse an existing ``out`` (unless ``overwrite`` and it is an earlier export -- it holds
    ``marker`` -- or empty)."""
    if out.exists() and not out.is_dir():
        raise LittuneError(f"{out} is a file; choose another --out (nothing was written)")
    if not out.exists():
        return
    if not overwrite:
        raise LittuneError(f"{out} exists; choose another --out or pass --overwrite (nothing was written)")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise LittuneError(f"{out} is not a littune {what} (no {marker}); --overwrite replaces "
                           "only an earlier export or an empty folder (nothing was written)")


def _write_folder(model, folder: Path, exporter: str | None = None) -> dict:
    text_err, text_exporter = export_text(model, folder / TEXT_NAME, exporter)
    try:
        err, used = export_image(model, folder / IMAGE_NAME, exporter)
        image = {"image": {"file": IMAGE_NAME, "input": "pixels", "output": "image_embeddings",
                           "max_abs_diff": err, "exporter": used}, "image_skipped": None}
    except LittuneError as e:
        (folder / IMAGE_NAME).unlink(missing_ok=True)
        print(f"littune: image tower not exported, the text side only: {e}", file=sys.stderr)
        image = {"image": None, "image_skipped": str(e)}
    export_tokenizer(model, folder / TOKENIZER_NAME)
    record = onnx_record(model, text_err, image, text_exporter)
    write_json(folder / META_NAME, record)
    return record


def export_onnx_model(model, out: str | Path, overwrite: bool = False, exporter: str | None = None) -> dict:
    """Write the ONNX export of ``model`` to the folder ``out``; returns ``littune_onnx.json``'s record.
    ``exporter``: :data:`littune.towers.exporters.EXPORTERS`; None: ``$LITTUNE_ONNX_EXPORTER``, else the
    default (TorchScript), with the other as fallback (:func:`littune.towers.exporters.with_fallback`).

    Raises :class:`LittuneError` (one line, nothing written) if ``out`` exists (see ``overwrite`` in
    the module docstring), or if the text side cannot be exported or disagrees with torch."""
    check_out(Path(out), overwrite)
    return write_export(model, out, lambda tmp: _write_folder(model, tmp, exporter))


def write_export(model, out: str | Path, write) -> dict:
    """Run ``write(folder) -> record`` on a temporary folder beside ``out`` with ``model`` in eval mode,
    then move the folder into place (:func:`move_into_place`); the model's mode is given back."""
    out = Path(out).resolve()  # "." or "runs/x/" have a name to put the temporary folder beside
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    was = model.training
    model.eval()
    try:
        record = write(tmp)
        move_into_place(tmp, out)
    finally:
        model.train(was)
        shutil.rmtree(tmp, ignore_errors=True)
    return record
