"""Image-text retrieval metrics with the COCO protocol.

Each image may have several captions; ``text_to_image[t]`` names the image of caption ``t``.

* **Text to image** (``image_retrieval_recall@K``, CLIP_benchmark's name: the *image* is retrieved):
  every caption is a query over all images; it is correct when its own image is among the top K.
* **Image to text** (``text_retrieval_recall@K``): every image is a query over all captions; it is
  correct when *any* of its captions is among the top K. Images with no caption are left out of
  this average (they still take part as distractors for the text queries).

Similarity is the dot product of the L2-normalised embeddings. **Ties** are broken in favour of
the lower index, as a stable sort by descending score would: an item's rank is the number of items
scoring strictly higher plus the number scoring exactly the same with a lower index. For an image
query, the rank that counts is that of its best-placed caption. The similarity matrix is computed in
chunks of queries, so memory stays at ``chunk x gallery`` whatever the set size.

:func:`evaluate_retrieval` runs the whole evaluation on a :class:`~littune.eval.sets.RetrievalSet`;
its image embeddings come from :func:`littune.inference.embeddings.image_embeddings` (from the images, or from
an embedding cache's image features when one is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..inference.embeddings import image_embeddings, text_embeddings
from ..errors import LittuneError


def _tensor(x, what: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.float().cpu()
    if t.ndim != 2:
        raise LittuneError(f"{what} must be (n, dim), got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise LittuneError(f"{what} contain NaN")
    return t


def retrieval_ranks(image_emb, text_emb, text_to_image: Sequence[int], chunk: int = 1024,
                    image_groups: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks ``(text_query_ranks (T,), image_query_ranks (N,))``.

    ``text_query_ranks[t]``: the rank of caption t's image among all images for query t.
    ``image_query_ranks[i]``: the rank of image i's best-placed caption among all captions
    (``-1`` for an image without captions). Ties go to the lower index.

    ``image_groups`` (one id per image) makes images of one group interchangeable: when the same
    captions describe several images (one concept drawn in two designs), a caption's query is right
    when the best-placed image of its image's group is in the top K, and an image query is right
    when any caption of any image of its group is. Without it every image is its own group.
    """
    img = _tensor(image_emb, "image embeddings")
    txt = _tensor(text_emb, "text embeddings")
    n, t = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise LittuneError(f"image embeddings are {img.shape[1]}-d but text embeddings are {txt.shape[1]}-d")
    owner = torch.as_tensor(np.asarray(text_to_image, dtype=np.int64).reshape(-1))
    if owner.numel() != t:
        raise LittuneError(f"text_to_image has {owner.numel()} entries for {t} texts")
    if t and (owner.min() < 0 or owner.max() >= n):
        raise LittuneError(f"text_to_image names image {int(owner.max() if owner.max() >= n else owner.min())}, "
                           f"but there are {n} images")
    chunk = max(1, int(chunk))
    if image_groups is None:
        group = torch.arange(n)
    else:
        group = torch.as_tensor(np.asarray(image_groups, dtype=np.int64).reshape(-1))
        if group.numel() != n:
            raise LittuneError(f"image_groups has {group.numel()} entries for {n} images")
    text_group = group[owner]

    # Text queries over images: the image that counts is the best-placed one of the caption's group.
    t_rank = torch.empty(t, dtype=torch.int64)
    img_idx = torch.arange(n)
    for s in range(0, t, chunk):
        sim = txt[s:s + chunk] @ img.T  # (c, N)
        ours = group[None, :] == text_group[s:s + chunk, None]  # (c, N)
        true = torch.where(ours, sim, torch.tensor(float("-inf"))).max(1).values[:, None]
        own = torch.where(ours & (sim == true), img_idx[None, :], torch.tensor(n)).min(1).values[:, None]
        t_rank[s:s + chunk] = (sim > true).sum(1) + ((sim == true) & (img_idx[None, :] < own)).sum(1)

    # Image queries over texts: the best-placed own caption is the one with the highest score,
    # the lowest index among equals.
    i_rank = torch.full((n,), -1, dtype=torch.int64)
    has = torch.isin(group, text_group)  # an image whose group has a caption is a query
    txt_idx = torch.arange(t)
    for s in range(0, n, chunk):
        sim = img[s:s + chunk] @ txt.T  # (c, T)
        rows = torch.arange(s, min(s + chunk, n))
        mine = text_group[None, :] == group[rows][:, None]  # (c, T)
        best = torch.where(mine, sim, torch.tensor(float("-inf"))).max(1).values[:, None]
        first = torch.where(mine & (sim == best), txt_idx[None, :], torch.tensor(t)).min(1).values[:, None]
        r = (sim > best).sum(1) + ((sim == best) & (txt_idx[None, :] < first)).sum(1)
        i_rank[s:s + chunk] = torch.where(has[s:s + chunk], r, torch.tensor(-1))
    return t_rank.numpy(), i_rank.numpy()


def retrieval_metrics(image_emb, text_emb, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                      image_groups: Sequence[int] | None = None) -> dict:
    """COCO-protocol recall@K both ways, with CLIP_benchmark's keys.

    ``image_retrieval_recall@K``: fraction of captions whose image is in their top K images.
    ``text_retrieval_recall@K``: fraction of images (with at least one caption) having any of their
    captions in their top K captions. Embeddings are ``(N, D)`` and ``(T, D)``, L2-normalised;
    ``text_to_image`` gives each caption's image index; ``image_groups`` makes the images of one
    group interchangeable (see :func:`retrieval_ranks`).
    """
    t_rank, i_rank = retrieval_ranks(image_emb, text_emb, text_to_image, image_groups=image_groups)
    if t_rank.size == 0:
        raise LittuneError("no captions to evaluate retrieval with")
    queried = i_rank >= 0
    out: dict[str, float] = {}
    for k in ks:
        if int(k) < 1:
            raise LittuneError(f"recall@K needs K >= 1, not {k}")
        out[f"image_retrieval_recall@{int(k)}"] = float(np.mean(t_rank < int(k)))
    for k in ks:
        out[f"text_retrieval_recall@{int(k)}"] = float(np.mean(i_rank[queried] < int(k)))
    return out


@dataclass
class RetrievalResult:
    """What :func:`evaluate_retrieval` measured."""

    metrics: dict
    n_images: int
    n_texts: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def evaluate_retrieval(model, dataset, cache: str | Path | None = None, batch_size: int = 64,
                       ks: Sequence[int] = (1, 5, 10), progress: bool = False, reuse: bool = False) -> RetrievalResult:
    """Recall@K both ways of ``model`` on a :class:`~littune.eval.sets.RetrievalSet`.

    Images that cannot be decoded (or are missing from the cache) are dropped with their captions
    and listed in ``skipped``. ``reuse``: see :func:`~littune.inference.embeddings.image_embeddings`.
    """
    img, kept, skipped = image_embeddings(model, dataset.records, cache=cache, batch_size=batch_size,
                                          progress=progress, skip_bad=True, reuse=reuse)
    if not kept:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise LittuneError(f"no image of {dataset.description} could be embedded ({len(skipped)} skipped{first})")
    new_index = {old: new for new, old in enumerate(kept)}
    texts, owner = [], []
    for text, i in zip(dataset.texts, dataset.text_to_image):
        if i in new_index:
            texts.append(text)
            owner.append(new_index[i])
    if not texts:
        raise LittuneError(f"none of the embedded images of {dataset.description} has a caption")
    txt = text_embeddings(model, texts, progress=progress)
    metrics = retrieval_metrics(img, txt, owner, ks=ks)
    return RetrievalResult(metrics, n_images=len(kept), n_texts=len(texts), skipped=skipped)
