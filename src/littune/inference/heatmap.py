"""Zero-shot heat maps: where in an image a text matches.

With a linear image head (or none), the image embedding before normalisation is the head applied to
the tower's pooled features; for a mean-pooled tower those are the mean of its spatial features
(:mod:`littune.towers.spatial`), so the same head applied at each location gives an embedding per
location whose mean is the image's own -- and its cosine with a text embedding says how well the text
matches there. Nothing is trained for it::

    hm = model.heatmap("kitchen.jpg", ["a cup of coffee", "a cat"])
    hm.maps            # (2, h, w) cosines (7 x 7 for EfficientNet-Lite0 at 224 px)
    hm.probabilities   # (2,) softmax over the texts of the pooled embedding (as classify gives)
    hm.crop            # the map's area in the image's pixels (the eval view's centre crop)
    hm.box             # the whole image in map cells (to draw the image under the map)

The tower runs once on the image, in torch (never through onnxruntime, which gives only the pooled
output), under ``no_grad`` and in eval mode. :func:`cached_heatmap` draws the same maps from a token cache
(``littune embed --tokens``) without running the tower: the cached tokens and pooled features of the image
go through the same head and cosines (:func:`cached_heatmaps` for a batch of cached images). For a CLS-pooled ViT the patch tokens only approximate
what the head was trained on (``exact`` is False; ``how`` says which). :func:`heatmaps` does the same
for a batch of pixels against one set of text embeddings (the pointing game,
:mod:`littune.eval.pointing`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .embeddings import ImageLike, describe, evaluating, load_rgb, model_device
from ..errors import LittuneError
from ..towers.spatial import SpatialFeatures, spatial_features
from ..cache.tokens import pool_map
from ..model.heads import AttentionPoolHead, check_token_cache, reads_tokens


@dataclass
class HeatMap:
    """The heat maps of one image, one per text (see the module doc)."""

    texts: list[str]
    #: ``(T, h, w)`` float32: cosine of each location's embedding with each text's
    maps: np.ndarray
    #: ``(T,)``: cosine of the image's pooled embedding (from the same pass) with each text's
    pooled: np.ndarray
    #: ``(T,)``: softmax over the texts of ``exp(logit_scale) * pooled`` (classify's probabilities)
    probabilities: np.ndarray
    #: ``(left, top, right, bottom)``: the area the map covers, in the image's pixels
    crop: tuple[float, float, float, float]
    #: ``(x0, y0, x1, y1)``: the whole image in map coordinates (the map spans ``0..w`` x ``0..h``)
    box: tuple[float, float, float, float]
    #: ``(width, height)`` of the image (a file's full size, even when a JPEG was decoded smaller)
    image_size: tuple[int, int]
    #: the pooled embedding is exactly the mean of the map's embeddings (a mean-pooled tower)
    exact: bool
    #: one line: what the map is read from
    how: str
    #: the decoded RGB image (Pillow)
    image: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.maps.shape[1]), int(self.maps.shape[2])

    def peak(self, i: int) -> tuple[float, float]:
        """``(x, y)``: the centre of text ``i``'s highest cell, in the image's pixels."""
        return cell_centre(self.maps[i], self.crop)


def cell_centre(heat: np.ndarray, crop: Sequence[float]) -> tuple[float, float]:
    """The centre of the highest cell of the map ``heat`` ``(h, w)`` covering ``crop`` (first cell on ties)."""
    h, w = heat.shape
    r, c = divmod(int(np.argmax(heat)), w)
    left, top, right, bottom = crop
    return left + (c + 0.5) * (right - left) / w, top + (r + 0.5) * (bottom - top) / h


def image_box(crop: Sequence[float], size: tuple[int, int], grid: tuple[int, int]) -> tuple[float, float, float, float]:
    """The image ``size`` ``(width, height)`` in map coordinates, for a ``grid`` ``(h, w)`` map covering ``crop``."""
    left, top, right, bottom = crop
    sx, sy = grid[1] / (right - left), grid[0] / (bottom - top)
    return (-left * sx, -top * sy, (size[0] - left) * sx, (size[1] - top) * sy)


def _check_head(model) -> None:
    if not isinstance(model.image_head, (nn.Linear, nn.Identity, AttentionPoolHead)):
        raise LittuneError(f"heat maps need a linear or attention image head (or none), not "
                           f"{type(model.image_head).__name__}")


def spatial_embeddings(model, pixels: torch.Tensor) -> tuple[torch.Tensor, SpatialFeatures]:
    """``(B, h, w, D)``: the image head applied to each location's feature (not normalised; its mean over
    the locations is the image embedding before normalisation when ``exact``), and the tower's
    :class:`SpatialFeatures` of the same pass. Runs the image tower in torch, without gradients. The
    attention head: each location's share (:meth:`~littune.model.heads.AttentionPoolHead.location_embeddings`),
    whose mean is always the image embedding before normalisation (``exact``)."""
    _check_head(model)
    with evaluating(model):
        sf = spatial_features(model.image_tower, pixels.to(model_device(model)))
        grid = getattr(model.image_head, "grid", None)  # the token grid the attention head was trained on
        if grid is not None and tuple(grid) != sf.grid:
            sf = replace(sf, features=pool_map(sf.features, grid), how=f"{sf.how}; average-pooled to "
                                                                        f"{grid[0]} x {grid[1]} (as trained)")
        if reads_tokens(model):  # the attention head: each location's share of the pooled embedding: exact
            sf = replace(sf, exact=True, how=f"{sf.how}; attention head: each location's share of the image "
                                             "embedding (exact)")
        return _head_at(model, sf.features), sf


def _head_at(model, features: torch.Tensor) -> torch.Tensor:
    """The image head applied to each location's feature ``(B, h, w, F)`` -> ``(B, h, w, D)`` (an attention head:
    each location's share of the image embedding)."""
    head = model.image_head
    if isinstance(head, AttentionPoolHead):
        b, h, w, f = features.shape
        return head.location_embeddings(features.reshape(b, h * w, f).to(head.weight.dtype)).reshape(b, h, w, -1)
    dtype = head.weight.dtype if isinstance(head, nn.Linear) else features.dtype
    return head(features.to(dtype))


def _head_input(model, features: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """What the image head reads: the map's tokens ``(B, h*w, F)`` (an attention head: ``pooled`` is not read
    and may be None) or the pooled features."""
    return features.flatten(1, 2) if reads_tokens(model) else pooled


def _cosines(model, emb: torch.Tensor, head_input: torch.Tensor,
             weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps (B, T, h, w), pooled (B, T))``: cosines of the location embeddings ``emb`` and of the image
    embedding of ``head_input`` (:func:`_head_input`) with the normalised text embeddings ``weights``."""
    with evaluating(model):
        w = weights.to(emb.device, emb.dtype)
        maps = torch.einsum("bhwd,td->bthw", F.normalize(emb, dim=-1), w)
        pooled = model.embed_image_features(head_input.to(emb.device)) @ w.T
    return maps.float().cpu(), pooled.float().cpu()


def heatmaps(model, pixels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SpatialFeatures]:
    """``(maps (B, T, h, w), pooled (B, T), spatial features)``: cosines of each location's embedding
    and of the pooled embedding of ``pixels`` with the normalised text embeddings ``weights`` ``(T, D)``."""
    emb, sf = spatial_embeddings(model, pixels)
    return (*_cosines(model, emb, _head_input(model, sf.features, sf.pooled), weights), sf)


def cached_heatmaps(model, cache, indices: Sequence[int], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps (B, T, h, w), pooled (B, T))`` of the cached images ``indices`` of the token cache ``cache`` (an
    :class:`~littune.cache.EmbeddingCache` of the model's tower): :func:`heatmaps`' cosines, from the cached
    tokens and pooled features (the tower does not run)."""
    _check_head(model)
    cache.check(tower_fingerprint=model.image_tower.fingerprint())
    if reads_tokens(model):
        check_token_cache(cache, model.image_head.grid or True)
    h, w = cache.token_grid or (0, 0)
    tokens = cache.tokens(indices)  # one line if the cache has none
    dev = model_device(model)
    feats = torch.from_numpy(tokens).to(dev).reshape(len(tokens), h, w, cache.token_dim)
    with evaluating(model):
        emb = _head_at(model, feats)
    pooled = None if reads_tokens(model) else torch.from_numpy(cache.features(indices))  # what the head reads
    return _cosines(model, emb, _head_input(model, feats, pooled), weights)


def text_weights(model, texts: Sequence[str], templates: str | Sequence[str] = "none") -> torch.Tensor:
    """``(T, D)`` normalised text embeddings: each text through ``templates`` (a set name, a file or a list;
    ``none``: the text as it is), the templates' embeddings averaged (as zero-shot classification does)."""
    from ..eval.templates import load_templates
    from ..eval.zeroshot import zeroshot_classifier

    texts = [str(t).strip() for t in texts]
    if not texts or any(not t for t in texts):
        raise LittuneError("the text list is empty" if not texts else "the text list has an empty text")
    tpl = load_templates(templates) if isinstance(templates, str) else list(templates)
    return zeroshot_classifier(model, texts, tpl).float()


def heatmap(model, image: ImageLike, texts: Sequence[str], templates: str | Sequence[str] = "none",
            weights: torch.Tensor | None = None) -> HeatMap:
    """The heat maps of ``image`` (a path, a Pillow image or a record) for ``texts`` (see the module doc).
    ``weights``: the texts' normalised embeddings ``(T, D)`` if the caller has them already (``templates``
    is then not read)."""
    from ..data.decode import SIZE_INFO, BadImage

    pre = model.preprocess
    try:
        img = load_rgb(image, pre.draft_to)
    except BadImage as e:
        raise LittuneError(f"cannot read image {describe(image)}: {e.reason}"
                           + (f": {e.detail}" if e.detail else "")) from None
    if weights is None:
        weights = text_weights(model, texts, templates)
    elif len(weights) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(weights)} text embeddings")
    maps, pooled, sf = heatmaps(model, pre.eval(img)[None], weights)
    return _heatmap(model, texts, maps[0], pooled[0], img, sf.exact, sf.how)


def _heatmap(model, texts, maps: torch.Tensor, pooled: torch.Tensor, img, exact: bool, how: str) -> HeatMap:
    """The :class:`HeatMap` of one image's ``maps`` ``(T, h, w)`` and ``pooled`` ``(T,)`` over the decoded image
    ``img`` (None: the eval view's own square, in its pixels)."""
    from ..data.decode import SIZE_INFO

    pre = model.preprocess
    if img is None:
        size, crop = (pre.size, pre.size), (0.0, 0.0, float(pre.size), float(pre.size))
    else:
        size = tuple(int(v) for v in img.info.get(SIZE_INFO, img.size))
        sx, sy = size[0] / img.size[0], size[1] / img.size[1]  # a JPEG decoded at a DCT scale is smaller
        left, top, right, bottom = pre.eval_box(*img.size)
        crop = (left * sx, top * sy, right * sx, bottom * sy)
    scale = model.logit_scale.detach().exp().float().cpu()
    return HeatMap(texts=[str(t).strip() for t in texts], maps=maps.numpy(), pooled=pooled.numpy(),
                   probabilities=F.softmax(scale * pooled, dim=-1).numpy(), crop=crop,
                   box=image_box(crop, size, tuple(maps.shape[1:])), image_size=size, exact=exact, how=how, image=img)


def cached_heatmap(model, cache, index: int, texts: Sequence[str], templates: str | Sequence[str] = "none",
                   weights: torch.Tensor | None = None, image: ImageLike | None = None) -> HeatMap:
    """The heat maps of image ``index`` of the token cache ``cache`` (a directory or an opened
    :class:`~littune.cache.EmbeddingCache` embedded with ``--tokens`` by the model's tower) for ``texts``:
    what :func:`heatmap` gives for that image (to float16 rounding, on the stored grid), without running the
    tower. ``image`` (default: the file the cache read, when it is one) is decoded for the map's place over
    the image only; without one the map covers the eval view's square (``crop`` in its pixels)."""
    import os

    from ..cache import EmbeddingCache
    from ..data.decode import BadImage

    cache = cache if isinstance(cache, EmbeddingCache) else EmbeddingCache.open(cache, verify=False)
    if weights is None:
        weights = text_weights(model, texts, templates)
    elif len(weights) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(weights)} text embeddings")
    maps, pooled = cached_heatmaps(model, cache, [index], weights)
    if image is None and os.path.isfile(cache.path(index)):
        image = cache.path(index)
    try:
        img = None if image is None else load_rgb(image, model.preprocess.draft_to)
    except BadImage as e:
        raise LittuneError(f"cannot read image {describe(image)}: {e.reason}"
                           + (f": {e.detail}" if e.detail else "")) from None
    t = cache.manifest["tokens"]
    return _heatmap(model, texts, maps[0], pooled[0], img, bool(t.get("exact")), str(t.get("how", "")))
