"""Validation during training: zero-shot classification and retrieval on held-out caches.

Both read image features from an embedding cache written by ``littune embed`` with the same locked
tower (the image model is not loaded) and turn them into image embeddings with the model's head
(:func:`littune.inference.embeddings.cached_image_embeddings`). Zero-shot: a class-folder source
(``root/<class>/*.png``); an image's class is the top-level folder of its key under the root, the rule
``littune eval zeroshot`` follows (:func:`littune.eval.sets.key_classes`: ``cat/2019/x.png`` is a ``cat``),
display names come from ``classnames.txt`` (one per line, in sorted folder order) when given. Retrieval: a captioned source;
every caption of an image counts; with ``group_by_folder: true`` the images of one folder answer each
other's captions.
"""

from __future__ import annotations

from pathlib import Path

from ..inference.embeddings import cached_image_embeddings, text_embeddings
from ..eval.retrieval import retrieval_metrics
from ..eval.sets import folder_labels
from ..eval.templates import load_templates
from ..eval.zeroshot import zeroshot_classifier, zeroshot_metrics


def class_labels(cache, classnames_file: str | None = None) -> tuple[list[str], list[int]]:
    """Classes from the top-level folder of each key (:func:`~littune.eval.sets.key_classes`); display names
    from ``classnames.txt`` if given."""
    return folder_labels([cache.key(i) for i in range(len(cache))], classnames_file)


def zeroshot_on_cache(model, cache, classnames_file=None, templates="short", memo: dict | None = None) -> dict:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` on the images of an opened embedding cache
    (``memo``: see :func:`littune.inference.embeddings.text_embeddings`)."""
    names, labels = class_labels(cache, classnames_file)
    classifier = zeroshot_classifier(model, names, load_templates(templates), memo=memo).float().cpu()
    logits = cached_image_embeddings(model, cache) @ classifier.t()
    return zeroshot_metrics(logits, labels)


def retrieval_on_cache(model, cache, group_by_folder: bool = False, memo: dict | None = None) -> dict:
    """Recall@K both ways; ``group_by_folder``: images in one folder share their captions (one
    concept in several designs), so any of them answers a caption (see ``retrieval_ranks``)."""
    texts, owner = [], []
    for i in range(len(cache)):
        for c in cache.captions(i):
            texts.append(c)
            owner.append(i)
    txt = text_embeddings(model, texts, batch_size=512, memo=memo)  # captions shared by a concept's designs: encoded once
    groups = None
    if group_by_folder:
        folders = [str(Path(cache.key(i)).parent) for i in range(len(cache))]
        ids = {f: k for k, f in enumerate(dict.fromkeys(folders))}
        groups = [ids[f] for f in folders]
    return retrieval_metrics(cached_image_embeddings(model, cache), txt, owner, image_groups=groups)


def run_validation(model, val_cfg, device=None) -> dict:
    """``{name: metrics}`` for every zero-shot and retrieval set in the ``val`` section.

    The embeddings are computed on the model's own device; ``device`` is accepted for the trainer's
    call and not needed. A text that several sets share (the class names of two splits, a caption of
    two retrieval sets) is encoded once.
    """
    from ..cache import EmbeddingCache

    results, memo = {}, {}
    for item in val_cfg.zeroshot:
        cache = EmbeddingCache.open(item["cache"])
        cache.check(tower_fingerprint=model.image_fingerprint)
        results[item.get("name", Path(item["cache"]).name)] = zeroshot_on_cache(
            model, cache, item.get("classnames"), item.get("templates", "short"), memo)
    for item in val_cfg.retrieval:
        cache = EmbeddingCache.open(item["cache"])
        cache.check(tower_fingerprint=model.image_fingerprint)
        results[item.get("name", Path(item["cache"]).name)] = retrieval_on_cache(
            model, cache, bool(item.get("group_by_folder", False)), memo)
    return results
