"""Token caches: the locked tower's spatial map, stored beside its pooled features (``littune embed --tokens``).

With ``tokens`` a cache also keeps, for the eval view of every image, the tower's map from the same forward
pass as its pooled features (:func:`littune.towers.spatial.spatial_features`): a CNN's last feature map
(EfficientNet-Lite0: 7 x 7 x 1280 at 224 px), a ViT's patch tokens. ``tokens=GRID`` bounds its size: a map
larger than ``GRID x GRID`` is average-pooled to it (adaptive average pooling, as
``torch.nn.functional.adaptive_avg_pool2d``); a smaller one is kept as it is. Tokens are float16, row-major
over the grid, one file per shard (``shards/NNNNN.tokens.npy``, ``(n, h*w, F)``) whose size and sha256 the
shard's commit record and the manifest hold like the features file's. The grid, the tokens' size and the
pooling are deciding fields of the plan (:data:`KEY`): a cache with another grid, or none, is not reused;
the manifest's ``"tokens"`` says ``{"grid": [h, w], "dim": F, "pool": "none" | "avg", "exact", "how"}``
(``exact``: the pooled features are the mean of the stored tokens; ``how``: what the map is read from).

:class:`TokenRows` is the reader's part (``cache.tokens(indices)``, with ``pread`` only, as the features).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LittuneError
from .pread import OpenFiles, _Npy, image_rows, shard_runs

#: the token file of a shard, beside its features ``NNNNN.npy``
SUFFIX = ".tokens.npy"
#: the plan's deciding token fields (``KEY``) and its descriptive ones (``ABOUT``)
KEY, ABOUT = "tokens", "tokens_about"


def token_path(npy: Path) -> Path:
    """The token file beside the features shard ``npy`` (``shards/00003.npy`` -> ``shards/00003.tokens.npy``)."""
    return npy.with_name(npy.name[:-len(".npy")] + SUFFIX)


def check_request(tokens) -> bool | int | None:
    """``tokens`` as given to ``embed_source``: None/False (no tokens), True (the native grid) or a grid >= 1."""
    if tokens is None or tokens is False:
        return None
    if tokens is True:
        return True
    if isinstance(tokens, (int, np.integer)) and int(tokens) >= 1:
        return int(tokens)
    raise LittuneError(f"tokens must be True (the tower's own grid) or a grid size >= 1, not {tokens!r}")


def resolve(tower, tokens) -> dict | None:
    """The token spec of a run of ``tower`` for the request ``tokens`` (see :func:`check_request`): None, or
    ``{"grid": [h, w], "dim": F, "pool": "none" | "avg", "exact": bool, "how": str}``, learnt from one forward
    pass of one blank image (the map's size depends on the tower and its input size only)."""
    from ..towers.runtime import module_device
    from ..towers.spatial import spatial_features

    tokens = check_request(tokens)
    if tokens is None:
        return None
    size = tower.preprocess.size
    was = tower.training
    tower.eval()
    try:
        with torch.inference_mode():
            sf = spatial_features(tower, torch.zeros(1, 3, size, size, device=module_device(tower)))
    except LittuneError as e:
        raise LittuneError(f"--tokens: {e}") from None
    finally:
        tower.train(was)
    (h0, w0), dim = sf.grid, int(sf.features.shape[-1])
    grid = (h0, w0) if tokens is True else (min(tokens, h0), min(tokens, w0))
    pooled = grid != (h0, w0)
    exact = sf.exact and (not pooled or (h0 % grid[0] == 0 and w0 % grid[1] == 0))
    how = sf.how + (f"; average-pooled from {h0} x {w0} to {grid[0]} x {grid[1]}"
                    + ("" if exact or not sf.exact else " (uneven cells: their mean is not the pooled features)")
                    if pooled else "")
    return {"grid": list(grid), "dim": dim, "pool": "avg" if pooled else "none", "exact": exact, "how": how}


def pooled_and_map(tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled (B, D), map (B, h, w, F))`` of one forward pass (what a runner's ``spatial`` computes)."""
    from ..towers.spatial import spatial_features

    sf = spatial_features(tower, pixels)
    return sf.pooled, sf.features


def plan_fields(spec: dict | None) -> dict:
    """The plan's token fields: the deciding ones and the descriptive ones (none without tokens)."""
    if not spec:
        return {}
    return {KEY: {k: spec[k] for k in ("grid", "dim", "pool")}, ABOUT: {k: spec[k] for k in ("exact", "how")}}


def manifest_fields(plan: dict) -> dict:
    """The manifest's ``"tokens"`` from the plan (none without tokens)."""
    if not plan.get(KEY):
        return {}
    return {"tokens": {**plan[KEY], **plan.get(ABOUT, {})}}


def to_grid(fmap: torch.Tensor, grid: Sequence[int], every: int = 1) -> np.ndarray:
    """``(B / every, h*w, F)`` float32 tokens of the map ``fmap`` ``(B, H, W, F)`` (rows ``0, every, ...``: the
    eval views of a batch of ``1 + views`` views per image), average-pooled to ``grid`` when it is smaller.
    Each token is computed from its own image alone (the bytes do not depend on the batch)."""
    fmap = pool_map(torch.as_tensor(fmap)[::every].float(), grid)
    b, h, w, f = fmap.shape
    return np.ascontiguousarray(fmap.reshape(b, h * w, f).cpu().numpy())


def pool_map(fmap: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The map ``fmap`` ``(B, H, W, F)`` average-pooled to ``grid`` ``(h, w)`` (adaptive average pooling) when
    it differs, as :func:`to_grid` stores it (a torch function: a model pools the tower's map to the grid its
    attention head was trained on with it, in training, inference and its ONNX graph)."""
    h, w = int(grid[0]), int(grid[1])
    if (h, w) != tuple(fmap.shape[1:3]):
        fmap = F.adaptive_avg_pool2d(fmap.permute(0, 3, 1, 2), (h, w)).permute(0, 2, 3, 1)
    return fmap


def bytes_per_image(cache) -> float:
    """Bytes on disk per image of a cache's token files (0 for an empty cache or one without tokens)."""
    total = sum(s["tokens"]["bytes"] for s in cache.manifest["shards"] if s.get("tokens"))
    return total / max(1, len(cache))


def size_line(cache) -> str:
    """One line: the tokens a cache stores and their bytes per image on disk."""
    t = cache.manifest["tokens"]
    (h, w), total = t["grid"], sum(s["tokens"]["bytes"] for s in cache.manifest["shards"] if s.get("tokens"))
    pooled = "" if t["pool"] == "none" else ", average-pooled"
    return (f"tokens: {h} x {w} x {t['dim']} float16 per image{pooled}; {bytes_per_image(cache):,.0f} bytes per image "
            f"on disk ({total / 2**20:,.1f} MiB in {cache.directory / 'shards'}/*{SUFFIX})")


def shard_files(entry: dict):
    """``(file, bytes, sha256)`` of each file of a manifest's shard entry: its features, and its tokens."""
    yield entry["file"], entry["bytes"], entry["sha256"]
    if entry.get("tokens"):
        t = entry["tokens"]
        yield t["file"], t["bytes"], t["sha256"]


class TokenRows:
    """The token part of :class:`~littune.cache.EmbeddingCache` (a mixin: it reads the reader's manifest,
    directory, shard list and ``max_open``)."""

    @property
    def has_tokens(self) -> bool:
        """Whether the cache stores tokens (``littune embed --tokens``)."""
        return bool(self.manifest.get("tokens"))

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """``(h, w)`` of the stored token grid (None without tokens)."""
        t = self.manifest.get("tokens")
        return (int(t["grid"][0]), int(t["grid"][1])) if t else None

    @property
    def token_dim(self) -> int | None:
        """``F``: the size of one token (None without tokens)."""
        t = self.manifest.get("tokens")
        return int(t["dim"]) if t else None

    def tokens(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(len(indices), h*w, F)`` float32 tokens of the eval view of images ``indices``, in that order
        (row-major over the ``h x w`` grid), read with ``pread`` (one read per run of consecutive images)."""
        if not self.has_tokens:
            raise LittuneError(f"the cache {self.directory} was embedded without --tokens: littune embed SOURCE "
                               f"--out {self.directory} --tokens [GRID] --no-resume stores them")
        idx = image_rows(indices, len(self))
        h, w = self.token_grid
        stored = np.empty((len(idx), h * w, self.token_dim), dtype=np.float16)
        if not len(idx):
            return stored.astype(np.float32)
        order, runs = shard_runs(idx, self._starts)
        for a, b, j, local in runs:
            self._token_file(j).rows(local, local + b - a, out=stored[a:b])
        out = np.empty(stored.shape, dtype=np.float32)
        out[order] = stored
        return out

    def _token_file(self, j: int):
        files = self.__dict__.get("_token_files")
        if files is None:
            files = self._token_files = OpenFiles(self.max_open)
        return files.get(j, lambda: self._open_token_file(j))

    def _open_token_file(self, j: int):
        entry = self._shards[j]
        f = _Npy(self.directory / entry["tokens"]["file"])
        h, w = self.token_grid
        want = (entry["count"], h * w, self.token_dim)
        if f.shape != want or f.dtype != np.float16:
            f.close()
            raise LittuneError(f"{f.path} holds {f.dtype}{list(f.shape)}, the manifest says float16{list(want)}: "
                               "re-run `littune embed`")
        return f
