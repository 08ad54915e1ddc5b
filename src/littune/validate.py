"""Validation during training: zero-shot classification and retrieval on held-out caches.

Both read image features from an embedding cache written by ``littune embed`` with the same locked
tower (the image model is not loaded). Zero-shot: a class-folder source (``root/<class>/*.png``);
an image's class is the folder of its key, display names come from ``classnames.txt`` (one per line,
in sorted folder order) when given. Retrieval: a captioned source; every caption of an image counts;
with ``group_by_folder: true`` the images of one folder answer each other's captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _image_embeddings(model, cache, device, batch: int = 4096) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, len(cache), batch):
            idx = np.arange(s, min(s + batch, len(cache)))
            feats = torch.from_numpy(np.ascontiguousarray(cache.features(idx), dtype=np.float32)).to(device)
            out.append(model.embed_image_features(feats).float().cpu())
    return torch.cat(out)


def class_labels(cache, classnames_file: str | None = None) -> tuple[list[str], list[int]]:
    """Classes from the parent folder of each key; display names from ``classnames.txt`` if given."""
    return folder_labels([cache.key(i) for i in range(len(cache))], classnames_file)


def folder_labels(keys, classnames_file: str | None = None) -> tuple[list[str], list[int]]:
    """``(class names, label of each key)``: a key's class is its parent folder, classes in sorted
    folder order; display names from ``classnames.txt`` (one per line, that order) when given."""
    folders = [Path(k).parent.name for k in keys]
    classes = sorted(set(folders))
    index = {c: k for k, c in enumerate(classes)}
    names = [c.replace("_", " ") for c in classes]  # as `littune eval` reads folder names
    if classnames_file:
        names = [ln.strip() for ln in Path(classnames_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(classes):
            raise ValueError(f"{classnames_file} has {len(names)} names for {len(classes)} class folders")
    return names, [index[f] for f in folders]


def zeroshot_on_cache(model, cache, classnames_file=None, templates="short", device="cpu") -> dict:
    from .eval.templates import load_templates
    from .eval.zeroshot import zeroshot_classifier, zeroshot_metrics

    names, labels = class_labels(cache, classnames_file)
    classifier = zeroshot_classifier(model, names, load_templates(templates)).float().cpu()
    logits = _image_embeddings(model, cache, device) @ classifier.t()
    return zeroshot_metrics(logits, labels)


def retrieval_on_cache(model, cache, device="cpu", group_by_folder: bool = False) -> dict:
    """Recall@K both ways; ``group_by_folder``: images in one folder share their captions (one
    concept in several designs), so any of them answers a caption (see ``retrieval_ranks``)."""
    from .eval.retrieval import retrieval_metrics
    from .inference import embed_texts

    texts, owner = [], []
    for i in range(len(cache)):
        for c in cache.captions(i):
            texts.append(c)
            owner.append(i)
    txt = embed_texts(model, texts, batch_size=512)  # captions shared by a concept's designs: encoded once
    groups = None
    if group_by_folder:
        folders = [str(Path(cache.key(i)).parent) for i in range(len(cache))]
        ids = {f: k for k, f in enumerate(dict.fromkeys(folders))}
        groups = [ids[f] for f in folders]
    return retrieval_metrics(_image_embeddings(model, cache, device), txt, owner, image_groups=groups)


def run_validation(model, val_cfg, device="cpu") -> dict:
    """``{name: metrics}`` for every zero-shot and retrieval set in the ``val`` section."""
    from .cache import EmbeddingCache

    results = {}
    for item in val_cfg.zeroshot:
        cache = EmbeddingCache.open(item["cache"])
        cache.check(tower_fingerprint=model.image_fingerprint)
        results[item.get("name", Path(item["cache"]).name)] = zeroshot_on_cache(
            model, cache, item.get("classnames"), item.get("templates", "short"), device)
    for item in val_cfg.retrieval:
        cache = EmbeddingCache.open(item["cache"])
        cache.check(tower_fingerprint=model.image_fingerprint)
        results[item.get("name", Path(item["cache"]).name)] = retrieval_on_cache(
            model, cache, device, bool(item.get("group_by_folder", False)))
    return results
