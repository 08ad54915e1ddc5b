"""Spatial features: what an image tower pools, location by location, from one forward pass.

:func:`spatial_features` runs a tower once on a batch of pixels and returns its feature map laid out
``(B, h, w, F)`` (channels last), the pooled ``(B, F)`` features the tower's ``forward`` gives (from the
same pass), and whether the pooled features are *exactly* the mean of the map over its ``h x w``
locations. With a linear image head that makes the image embedding (before normalisation) the mean
of the head applied at each location -- a zero-shot map for free (:mod:`littune.inference.heatmap`).

* ``efficientnet-lite*``: the network's last feature map (``extract_features``: 1280 x 7 x 7 at 224 px),
  which the tower averages: **exact**.
* ``hf:`` towers: a ``(B, C, H, W)`` last hidden state (ConvNeXt, ResNet...) is averaged by the tower
  (``#cls`` and ``#mean`` alike): exact; ``#pooler`` normalises or transforms the mean: an approximation.
  Patch tokens of a ViT / DINOv2 (``(B, tokens, D)``; the grid from the config's ``patch_size`` and the
  pixels' size, the last ``h x w`` tokens, after any CLS and register tokens): exact for ``#mean`` when
  CLS is the only other token (the tower averages every token after the first), and for ``#cls+mean``,
  whose map is ``[CLS ; patch token]`` at each location (twice as wide); for a CLS-pooled tower
  (``#cls``, ``#pooler``) the patch tokens only **approximate** what the head was trained on: they live in
  the same space (after the final layer norm) but were never pooled.
* ``torch:`` factory towers whose network returns a map ``(B, C, H, W)`` (exact; the tiny test tower), or
  tokens ``(B, 1 + s*s, D)`` (a CLS token then a square grid: exact with ``pool=mean``).

A tower of another kind may define its own ``spatial_features(pixels) -> SpatialFeatures``. ONNX towers
(onnxruntime), ``timm:`` towers and the stand-in of an embedding cache have no spatial features here:
:func:`spatial_features` raises a one-line :class:`~littune.errors.LittuneError` naming the tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LittuneError
from .base import _pool
from .image import CachedFeaturesTower, EfficientNetLiteTower, HFVisionTower, TorchModuleTower

SUPPORTED = "efficientnet-lite, hf: (ViT, DINOv2, ConvNeXt...) or torch: towers whose network returns a map"


@dataclass
class SpatialFeatures:
    """One forward pass of a tower, kept location by location (see the module doc)."""

    #: ``(B, h, w, F)``: the tower's feature at each location of its map, channels last
    features: torch.Tensor
    #: ``(B, F)``: what the tower's ``forward`` gives for the same pixels (its pooled features)
    pooled: torch.Tensor
    #: ``pooled`` is exactly the mean of ``features`` over the ``h x w`` locations
    exact: bool
    #: one line: what the map is read from
    how: str

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])


def spatial_features(tower, pixels: torch.Tensor) -> SpatialFeatures:
    """The tower's spatial features of ``pixels`` ``(B, 3, S, S)`` (one forward pass; the caller chooses
    ``no_grad`` and eval mode). Raises :class:`LittuneError` for a tower that has none here."""
    own = getattr(tower, "spatial_features", None)
    if callable(own):
        return own(pixels)
    if isinstance(tower, EfficientNetLiteTower):
        fmap = tower.net.extract_features(pixels)
        return SpatialFeatures(_channels_last(fmap), tower.net._avg_pooling(fmap).flatten(1), True,
                               f"{tower.name}: the last feature map, mean-pooled by the tower (exact)")
    if isinstance(tower, HFVisionTower):
        return _hf_spatial(tower, pixels)
    if isinstance(tower, TorchModuleTower):
        return _torch_spatial(tower, pixels)
    if isinstance(tower, CachedFeaturesTower):
        raise LittuneError(f"{tower.name} was not loaded (the model was trained from an embedding cache): load the "
                           "model directory with littune.load() to draw heat maps")
    raise LittuneError(f"{getattr(tower, 'name', type(tower).__name__)}: no spatial features for heat maps "
                       f"(they need a tower run in torch: {SUPPORTED})")


def _channels_last(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.permute(0, 2, 3, 1)


def _hf_spatial(tower: HFVisionTower, pixels: torch.Tensor) -> SpatialFeatures:
    out = tower.net(pixel_values=pixels)
    hidden = getattr(out, "last_hidden_state", None)
    pooled = _hf_pooled(tower, out)
    if hidden is None:
        raise LittuneError(f"{tower.name}: the model gives no last hidden state to lay out as a map")
    if hidden.ndim == 4:
        exact = tower.pooling != "pooler"
        return SpatialFeatures(_channels_last(hidden), pooled, exact,
                               f"{tower.name}: the last feature map" + (", mean-pooled by the tower (exact)" if exact
                                                                        else " (the pooler transforms its mean: "
                                                                             "an approximation)"))
    patch = getattr(tower.net.config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if hidden.ndim != 3 or not isinstance(patch, int) or patch < 1:
        raise LittuneError(f"{tower.name}: cannot lay its output {list(hidden.shape)} out on a grid "
                           "(no patch_size in its config)")
    h, w = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    prefix = hidden.shape[1] - h * w
    if prefix < 0:
        raise LittuneError(f"{tower.name}: {hidden.shape[1]} tokens are fewer than its {h} x {w} patches")
    tokens = hidden[:, prefix:]
    if tower.pooling == "cls+mean":  # each location [CLS ; its patch token]: their mean is the pooled [CLS ; mean]
        tokens = torch.cat([hidden[:, :1].expand(-1, h * w, -1), tokens], dim=-1)
    exact = tower.pooling in ("mean", "cls+mean") and prefix == 1
    how = (f"{tower.name}: {h} x {w} patch tokens, " +
           (f"{tower.pooling}-pooled by the tower (exact)" if exact else
            f"{'the mean of every token after the first (registers too)' if tower.pooling == 'mean' else 'CLS'}"
            "-pooled by the tower: the patch tokens approximate it"))
    return SpatialFeatures(tokens.reshape(hidden.shape[0], h, w, tokens.shape[2]), pooled, exact, how)


def _hf_pooled(tower: HFVisionTower, out) -> torch.Tensor:
    """What :meth:`HFVisionTower.forward` returns, from the model output ``out`` of the same pass."""
    if tower.pooling == "pooler" or getattr(out, "last_hidden_state", None) is None:
        return _pool(out.pooler_output, "cls")
    return _pool(out.last_hidden_state, tower.pooling)


def _torch_spatial(tower: TorchModuleTower, pixels: torch.Tensor) -> SpatialFeatures:
    out = tower.net(pixels)
    pooled = _pool(out, tower.pooling)
    if out.ndim == 4:
        return SpatialFeatures(_channels_last(out), pooled, True,
                               f"{tower.name}: the network's feature map, mean-pooled by the tower (exact)")
    side = int(round((out.shape[1] - 1) ** 0.5)) if out.ndim == 3 and out.shape[1] > 1 else 0
    if out.ndim != 3 or side * side != out.shape[1] - 1:
        raise LittuneError(f"{tower.name}: its network returns {list(out.shape)}, not a map (B, C, H, W) or a CLS "
                           "token and a square grid of tokens (B, 1 + s*s, D): no spatial features for heat maps")
    tokens = out[:, 1:]
    if tower.pooling == "cls+mean":  # [CLS ; token] at each location, as for an hf: tower
        tokens = torch.cat([out[:, :1].expand(-1, side * side, -1), tokens], dim=-1)
    exact = tower.pooling in ("mean", "cls+mean")
    return SpatialFeatures(tokens.reshape(out.shape[0], side, side, tokens.shape[2]), pooled, exact,
                           f"{tower.name}: {side} x {side} tokens, " + (f"{tower.pooling}-pooled by the tower (exact)"
                                                                       if exact else
                                                                       "CLS-pooled: the tokens approximate it"))
