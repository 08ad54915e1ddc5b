"""Zero-shot classification: class names become text embeddings, images are scored against them.

:func:`zeroshot_classifier` turns class names and prompt templates into a ``(C, D)`` weight matrix:
for each class, every template is filled with the class name, the texts are embedded and
L2-normalised, and their mean is renormalised (CLIP's prompt ensembling). An image's logits are its
normalised embedding times that matrix; the temperature does not change any ranking, so metrics
ignore it.

:func:`zeroshot_metrics` gives the numbers CLIP_benchmark reports -- ``acc1``, ``acc5`` and
``mean_per_class_recall`` -- from logits and integer labels. **Ties** are broken deterministically
in favour of the lower class index, as a stable sort by descending score would: the rank of the true
class is the number of classes scoring strictly higher plus the number scoring exactly the same with
a lower index, and a sample is top-k correct when that rank is below k. So a row of equal logits
predicts class 0 (what ``argmax`` returns). When k is at least the number of classes every sample
is top-k correct. ``mean_per_class_recall`` is the top-1 recall averaged over the classes that occur
in ``labels`` (classes with no sample are left out, as scikit-learn's balanced accuracy does).

:func:`per_class_table` and :func:`confusion_matrix` give the detail behind the averages;
:func:`save_confusion_png` draws the matrix (matplotlib, the ``plot`` extra). :func:`evaluate_zeroshot`
runs the whole evaluation on a :class:`~littune.eval.sets.LabeledImages` set; its image embeddings
come from :func:`littune.inference.embeddings.image_embeddings` (from the images, or from an embedding cache's
image features when one is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..inference.embeddings import image_embeddings, model_device, text_embeddings
from ..errors import LittuneError
from .templates import PLACEHOLDER, fill


def zeroshot_classifier(model, classnames: list[str], templates: list[str], batch_size: int = 256,
                        memo: dict | None = None) -> torch.Tensor:
    """``(C, D)`` class weights on the model's device: per class, the mean of the L2-normalised
    embeddings of its filled templates, renormalised. Runs without gradients in eval mode and
    restores the model's mode afterwards. ``memo``: see :func:`littune.inference.embeddings.text_embeddings`."""
    classnames = [str(c) for c in classnames]
    templates = list(templates)
    if not classnames:
        raise LittuneError("no class names: the label list is empty")
    if not templates:
        raise LittuneError("no prompt templates")
    missing = [t for t in templates if PLACEHOLDER not in t]
    if missing:
        raise LittuneError(f"template {missing[0]!r} has no '{{}}' for the class name")
    texts = [fill(t, c) for c in classnames for t in templates]
    emb = text_embeddings(model, texts, batch_size=batch_size, memo=memo)  # already normalised per text
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).to(model_device(model))


def _as_array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise LittuneError(f"{what} must be numeric")
    return arr


def _labels(labels, n: int, num_classes: int | None = None) -> np.ndarray:
    lab = _as_array(labels, "labels")
    if lab.ndim != 1 or lab.shape[0] != n:
        raise LittuneError(f"labels must be a 1-D sequence of {n} class indices, got shape {lab.shape}")
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise LittuneError("labels must be integer class indices")
    lab = lab.astype(np.int64)
    if num_classes is not None and lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = lab[(lab < 0) | (lab >= num_classes)][0]
        raise LittuneError(f"label {bad} is out of range for {num_classes} classes")
    return lab


def _logits(logits) -> np.ndarray:
    arr = _as_array(logits, "logits").astype(np.float32, copy=False)
    if arr.ndim != 2:
        raise LittuneError(f"logits must be (samples, classes), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise LittuneError("logits have no classes")
    if np.isnan(arr).any():
        raise LittuneError("logits contain NaN")
    return arr


def true_class_rank(logits, labels) -> np.ndarray:
    """0-based rank of each sample's true class (0 = predicted), ties to the lower class index."""
    arr = _logits(logits)
    lab = _labels(labels, arr.shape[0], arr.shape[1])
    true = arr[np.arange(arr.shape[0]), lab][:, None]
    idx = np.arange(arr.shape[1])[None, :]
    return (arr > true).sum(1) + ((arr == true) & (idx < lab[:, None])).sum(1)


def zeroshot_metrics(logits: torch.Tensor | np.ndarray, labels, topk: Sequence[int] = (1, 5)) -> dict:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` (keys ``acc<k>`` for each k in ``topk``).

    ``logits``: ``(N, C)`` scores; ``labels``: ``N`` class indices. Ties: see the module docstring.
    """
    arr = _logits(logits)
    lab = _labels(labels, arr.shape[0], arr.shape[1])
    if arr.shape[0] == 0:
        raise LittuneError("no samples to evaluate")
    rank = true_class_rank(arr, lab)
    out: dict[str, float] = {}
    for k in topk:
        if int(k) < 1:
            raise LittuneError(f"top-k needs k >= 1, not {k}")
        out[f"acc{int(k)}"] = float(np.mean(rank < int(k)))
    correct = rank == 0
    recalls = [float(correct[lab == c].mean()) for c in np.unique(lab)]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


def predictions(logits) -> np.ndarray:
    """Top-1 class per sample (ties to the lower index, like ``argmax``)."""
    return np.argmax(_logits(logits), axis=1)


def confusion_matrix(logits, labels, num_classes: int | None = None) -> np.ndarray:
    """``(C, C)`` int64 counts: row = true class, column = top-1 prediction."""
    arr = _logits(logits)
    c = arr.shape[1] if num_classes is None else num_classes
    lab = _labels(labels, arr.shape[0], c)
    cm = np.zeros((c, c), dtype=np.int64)
    np.add.at(cm, (lab, predictions(arr)), 1)
    return cm


def per_class_table(logits, labels, classnames: Sequence[str], topk: int = 5) -> list[dict]:
    """One row per class: ``class``, ``n`` (samples), ``recall`` (top-1), ``recall@<topk>``,
    ``precision`` (of top-1 predictions; ``None`` when the class is never predicted) and
    ``most_confused_with`` (the most frequent wrong prediction, ``None`` if none)."""
    arr = _logits(logits)
    if len(classnames) != arr.shape[1]:
        raise LittuneError(f"{len(classnames)} class names for {arr.shape[1]} logit columns")
    lab = _labels(labels, arr.shape[0], arr.shape[1])
    rank = true_class_rank(arr, lab)
    cm = confusion_matrix(arr, lab)
    rows = []
    for c, name in enumerate(classnames):
        mask = lab == c
        n = int(mask.sum())
        predicted = int(cm[:, c].sum())
        wrong = cm[c].copy()
        wrong[c] = 0
        rows.append({
            "class": name,
            "n": n,
            "recall": float((rank[mask] == 0).mean()) if n else None,
            f"recall@{topk}": float((rank[mask] < topk).mean()) if n else None,
            "precision": float(cm[c, c] / predicted) if predicted else None,
            "most_confused_with": classnames[int(wrong.argmax())] if wrong.sum() else None,
        })
    return rows


def save_confusion_png(cm: np.ndarray, classnames: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Draw a row-normalised confusion matrix (true class down, prediction across) to ``path``."""
    from ..plots import pyplot, save_figure

    plt = pyplot("drawing the confusion matrix")
    cm = np.asarray(cm)
    c = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    size = min(4 + 0.3 * c, 40)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= 60:
        ax.set_xticks(range(c), [str(n) for n in classnames], rotation=90, fontsize=max(4, 10 - c // 10))
        ax.set_yticks(range(c), [str(n) for n in classnames], fontsize=max(4, 10 - c // 10))
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title or "zero-shot confusion matrix")
    return save_figure(fig, path, dpi=110)


@dataclass
class ZeroShotResult:
    """What :func:`evaluate_zeroshot` measured: metrics plus the logits and labels behind them."""

    metrics: dict
    logits: torch.Tensor
    labels: list[int]
    classnames: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def per_class(self) -> list[dict]:
        return per_class_table(self.logits, self.labels, self.classnames)

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.logits, self.labels, len(self.classnames))


def evaluate_zeroshot(model, dataset, templates: list[str], cache: str | Path | None = None,
                      batch_size: int = 64, progress: bool = False, topk: Sequence[int] = (1, 5),
                      reuse: bool = False) -> ZeroShotResult:
    """Zero-shot metrics of ``model`` on a :class:`~littune.eval.sets.LabeledImages` set.

    Image embeddings come from the embedding cache ``cache`` (locked image tower only) or are
    computed from the images (``reuse``: a locked tower's features that embedding caches hold for the same
    files are read from them, see :func:`~littune.inference.embeddings.image_embeddings`); images that cannot be decoded
    are skipped and listed in ``skipped``.
    """
    emb, kept, skipped = image_embeddings(model, dataset.records, cache=cache, batch_size=batch_size,
                                          progress=progress, skip_bad=True, reuse=reuse)
    if not kept:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise LittuneError(f"no image of {dataset.description} could be embedded ({len(skipped)} skipped{first})")
    weights = zeroshot_classifier(model, dataset.classnames, templates).float().cpu()
    logits = emb @ weights.T
    labels = [dataset.labels[i] for i in kept]
    metrics = zeroshot_metrics(logits, labels, topk=topk)
    return ZeroShotResult(metrics, logits, labels, list(dataset.classnames), skipped)
