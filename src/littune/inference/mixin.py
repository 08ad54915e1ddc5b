"""Using a trained model: embed images and texts, classify images against your own labels.

:class:`InferenceMixin` is mixed into :class:`littune.model.LiTModel`, so a loaded model answers
directly::

    import littune
    model = littune.load("runs/lu/model")
    probs = model.classify(["cat.jpg", "dog.png"], ["cat", "dog", "horse"])   # (2, 3), rows sum to 1
    img = model.encode_images(["cat.jpg"])          # (1, D) float32, L2-normalised image embeddings
    txt = model.encode_texts(["a photo of a cat"])  # (1, D) float32, L2-normalised text embeddings
    (img @ txt.T)                                   # cosine similarities
    hm = model.heatmap("cat.jpg", ["cat", "sofa"])  # where each text matches: hm.maps is (2, h, w)

Images may be paths or Pillow images (or :class:`littune.data.records.Record` objects); they are
decoded by :func:`littune.data.decode.load_image` (EXIF upright, alpha on white) and preprocessed
with the image tower's evaluation transform (resize the shorter side, centre crop). The loops behind
these methods are :func:`littune.inference.embeddings.image_embeddings` and
:func:`littune.inference.embeddings.text_embeddings`, which evaluation, validation and indexing call too; class
embeddings come from :func:`littune.eval.zeroshot.zeroshot_classifier`. Every method works in
batches, runs without gradients, leaves the model's train/eval mode as it found it, and returns CPU
float32 tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .embeddings import ImageLike, evaluating, image_embeddings, load_rgb, model_device, text_embeddings

__all__ = ["ImageLike", "InferenceMixin", "evaluating", "load_rgb", "model_device", "repeated_label"]


class InferenceMixin:
    """Encode images and texts, classify images zero-shot (mixed into :class:`~littune.model.LiTModel`)."""

    def encode_images(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 64,
                      progress: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, D)`` (L2-normalised, float32, CPU) of images given as paths or PIL images.

        A single path or image is accepted too (``N = 1``). An image that cannot be decoded raises
        :class:`littune.errors.LittuneError` naming the file and the reason.
        """
        emb, _, _ = image_embeddings(self, _as_list(images), batch_size=batch_size, progress=progress)
        return emb

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, D)`` (L2-normalised, float32, CPU) of a list of strings (or one string)."""
        return text_embeddings(self, [texts] if isinstance(texts, str) else list(texts), batch_size, progress)

    def zeroshot_weights(self, labels: Sequence[str], templates: str | Sequence[str] = "short") -> torch.Tensor:
        """``(C, D)`` class embeddings: per label, the mean of its normalised template embeddings,
        renormalised. ``templates`` is a set name (:func:`littune.eval.templates.builtin_sets`), a file, or a
        list of template strings each holding ``{}``."""
        from ..eval.templates import load_templates
        from ..eval.zeroshot import zeroshot_classifier

        tpl = load_templates(templates) if isinstance(templates, (str, Path)) else list(templates)
        return zeroshot_classifier(self, list(labels), tpl).float().cpu()

    def classify(self, images: Sequence[ImageLike] | ImageLike, labels: Sequence[str],
                 templates: str | Sequence[str] = "short", multi_label: bool = False,
                 batch_size: int = 64) -> torch.Tensor:
        """Zero-shot probabilities ``(N, C)``: image ``n`` against label ``c``.

        Labels become prompts through ``templates`` (see :meth:`zeroshot_weights`). By default the
        labels are exclusive: ``softmax(exp(logit_scale) * cosine)`` over the labels, rows sum to 1.
        ``multi_label=True`` scores each label on its own with a sigmoid, using the model's learned
        bias when it was trained with the sigmoid loss (each value in [0, 1], rows need not sum to 1).
        """
        from ..errors import LittuneError

        labels = [str(x).strip() for x in labels]
        if not labels or any(not x for x in labels):
            raise LittuneError("the label list is empty" if not labels else "the label list has an empty label")
        weights = self.zeroshot_weights(labels, templates)
        return self.label_probabilities(self.encode_images(images, batch_size=batch_size), weights, multi_label)

    def heatmap(self, image: ImageLike, texts: Sequence[str], templates: str | Sequence[str] = "none"):
        """Zero-shot heat maps of one image: a :class:`~littune.inference.heatmap.HeatMap` whose ``maps`` ``(T, h, w)``
        are the cosines of each location's embedding (the image head applied to the tower's feature there)
        with each text's embedding (``templates``: ``none``, the text as given, or a set as in
        :meth:`classify`), with the map's area in the image (``crop``) and the image in map cells (``box``).
        The image tower runs once, in torch (not onnxruntime), without gradients; see :mod:`littune.inference.heatmap`."""
        from .heatmap import heatmap

        return heatmap(self, image, texts, templates)

    def label_probabilities(self, image_emb: torch.Tensor, weights: torch.Tensor,
                            multi_label: bool = False) -> torch.Tensor:
        """Probabilities ``(N, C)`` from normalised image embeddings and class weights (see :meth:`classify`)."""
        logits = self.logit_scale.detach().exp().float().cpu() * (image_emb.float().cpu() @ weights.float().cpu().T)
        if multi_label:
            bias = self.logit_bias.detach().float().cpu() if getattr(self, "logit_bias", None) is not None else 0.0
            return torch.sigmoid(logits + bias)
        return F.softmax(logits, dim=-1)


def _as_list(images) -> list:
    from PIL import Image

    if isinstance(images, (str, Path, Image.Image)) or (hasattr(images, "open") and hasattr(images, "key")):
        return [images]
    return list(images)


def repeated_label(labels: Sequence[str]) -> str | None:
    """The first label given twice (a classifier needs distinct labels), or ``None``."""
    seen: set[str] = set()
    for x in labels:
        if x in seen:
            return x
        seen.add(x)
    return None
