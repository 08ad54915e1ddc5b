"""Using a trained model: embed images and texts, classify images against your own labels.

:class:`InferenceMixin` is mixed into :class:`littune.model.LiTModel`, so a loaded model answers
directly::

    import littune
    model = littune.load("runs/lu/model")
    probs = model.classify(["cat.jpg", "dog.png"], ["cat", "dog", "horse"])   # (2, 3), rows sum to 1
    img = model.encode_images(["cat.jpg"])          # (1, D) float32, L2-normalised
    txt = model.encode_texts(["a photo of a cat"])  # (1, D) float32, L2-normalised
    (img @ txt.T)                                   # cosine similarities

Images may be paths or Pillow images (or :class:`littune.data.records.Record` objects); they are
decoded by :func:`littune.data.decode.load_image` (EXIF upright, alpha on white) and preprocessed
with the image tower's evaluation transform (resize the shorter side, centre crop). Decoding runs in
a few threads, one batch ahead of the model. Every method works in batches, runs without gradients,
leaves the model's train/eval mode as it found it, and returns CPU float32 tensors.

:func:`embed_images` is the loop behind :meth:`InferenceMixin.encode_images`; evaluation and
indexing call it with ``skip_bad=True`` to skip (and list) images that fail to decode.
"""

from __future__ import annotations

import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .data.records import Record

ImageLike = Union[str, Path, "Image.Image", "Record"]


def _describe(item: Any) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    where = getattr(item, "where", None)
    if where is not None:
        return str(where)
    return f"<{type(item).__name__}>"


def load_rgb(item: ImageLike):
    """An RGB Pillow image from a path, a Pillow image or a :class:`Record`.

    Raises :class:`littune.data.decode.BadImage` when the image cannot be decoded.
    """
    from PIL import Image

    from .data.decode import load_image, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, Path)):
        return load_image(item)
    if hasattr(item, "open") and hasattr(item, "key"):
        return item.open()
    raise TypeError(f"cannot read an image from {type(item).__name__}; give a path, a PIL image or a Record")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no gradients inside; the previous train/eval mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def embed_images(model, items: Sequence[ImageLike], batch_size: int = 64, workers: int | None = None,
                 progress: bool = False, skip_bad: bool = False, desc: str = "images"
                 ) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Embed images with ``model`` (tower, head, L2-normalise).

    Returns ``(embeddings, kept, skipped)``: a ``(len(kept), D)`` float32 CPU tensor, the indices of
    ``items`` that were embedded, and ``(where, reason)`` for the images that failed to decode. With
    ``skip_bad=False`` (the default) a bad image raises :class:`littune.errors.LittuneError` naming it.
    ``workers`` decoding threads (default: up to 4) prepare the next batch while the model runs.
    """
    from .data.decode import BadImage
    from .errors import LittuneError

    if batch_size < 1:
        raise LittuneError(f"batch size must be at least 1, not {batch_size}")
    items = list(items)
    preprocess = model.preprocess
    device = model_device(model)
    workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))

    def prepare(i: int):
        try:
            return preprocess.eval(load_rgb(items[i])), None
        except BadImage as e:
            return None, e.reason + (f": {e.detail}" if e.detail else "")

    out: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    batches = _batches(len(items), batch_size)
    bar = _progress(len(items), desc) if progress else None
    with evaluating(model), ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(prepare, i) for i in batches[0]] if batches else []
        for b, idx in enumerate(batches):
            ready = [f.result() for f in pending]
            pending = [pool.submit(prepare, i) for i in batches[b + 1]] if b + 1 < len(batches) else []
            tensors = []
            for i, (t, why) in zip(idx, ready):
                if t is None:
                    if not skip_bad:
                        for f in pending:
                            f.cancel()
                        raise LittuneError(f"cannot read image {_describe(items[i])}: {why}")
                    skipped.append((_describe(items[i]), why))
                    continue
                tensors.append(t)
                kept.append(i)
            if tensors:
                pixels = torch.stack(tensors).to(device)
                out.append(model.encode_image(pixels).float().cpu())
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    dim = model.config.embed_dim
    emb = torch.cat(out) if out else torch.empty(0, dim)
    return emb, kept, skipped


def embed_texts(model, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """``(len(texts), D)`` float32 CPU tensor of L2-normalised text embeddings (a text that repeats is
    encoded once)."""
    from .errors import LittuneError

    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise LittuneError(f"texts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    if batch_size < 1:
        raise LittuneError(f"batch size must be at least 1, not {batch_size}")
    # Each distinct text is encoded once (shared captions, repeated labels), in order of length so that
    # a batch pads little; the rows come back in the caller's order.
    unique = sorted(set(texts), key=lambda t: (len(t), t))
    device = model_device(model)
    out = []
    bar = _progress(len(unique), "texts") if progress else None
    with evaluating(model):
        for idx in _batches(len(unique), batch_size):
            toks = {k: v.to(device) for k, v in model.tokenize(unique[idx.start:idx.stop], padding="longest").items()}
            out.append(model.encode_text(**toks).float().cpu())
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    if not out:
        return torch.empty(0, model.config.embed_dim)
    where = {t: i for i, t in enumerate(unique)}
    return torch.cat(out)[torch.tensor([where[t] for t in texts], dtype=torch.long)]


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img" if desc == "images" else "it", file=sys.stderr,
                dynamic_ncols=True, leave=False)


class InferenceMixin:
    """Encode images and texts, classify images zero-shot (mixed into :class:`~littune.model.LiTModel`)."""

    def encode_images(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 64,
                      progress: bool = False) -> torch.Tensor:
        """L2-normalised embeddings ``(N, D)`` (float32, CPU) of images given as paths or PIL images.

        A single path or image is accepted too (``N = 1``). An image that cannot be decoded raises
        :class:`littune.errors.LittuneError` naming the file and the reason.
        """
        emb, _, _ = embed_images(self, _as_list(images), batch_size=batch_size, progress=progress)
        return emb

    def encode_texts(self, texts: Sequence[str] | str, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """L2-normalised embeddings ``(N, D)`` (float32, CPU) of a list of strings (or one string)."""
        return embed_texts(self, [texts] if isinstance(texts, str) else list(texts), batch_size, progress)

    def zeroshot_weights(self, labels: Sequence[str], templates: str | Sequence[str] = "short") -> torch.Tensor:
        """``(C, D)`` class embeddings: per label, the mean of its normalised template embeddings,
        renormalised. ``templates`` is a set name (``imagenet``, ``short``, ``none``...), a file, or a
        list of template strings each holding ``{}``."""
        from .eval.templates import load_templates
        from .eval.zeroshot import zeroshot_classifier

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
        from .errors import LittuneError

        labels = [str(x).strip() for x in labels]
        if not labels or any(not x for x in labels):
            raise LittuneError("the label list is empty" if not labels else "the label list has an empty label")
        weights = self.zeroshot_weights(labels, templates)
        return self.label_probabilities(self.encode_images(images, batch_size=batch_size), weights, multi_label)

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
