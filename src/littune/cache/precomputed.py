"""Writing a cache from features computed elsewhere: :func:`write_cache` (the format of :mod:`.format`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import LittuneError
from .format import DTYPES, SHARD_DIR, make_plan, manifest_entry, plan_hash, write_shard, write_tables
from .lock import clear, lock, unlock
from .reader import EmbeddingCache


def write_cache(out_dir: str | Path, features, captions, tower, *, keys: Sequence[str] | None = None,
                paths: Sequence[str] | None = None, dtype: str = "float16", shard_size: int = 2048,
                source_fingerprint: str | None = None, source: str = "precomputed features",
                langs: Sequence[Sequence[str]] | None = None, tokens=None) -> EmbeddingCache:
    """Write a cache from features computed elsewhere (in the format :func:`embed_source` writes).

    ``features``: ``(n, dim)`` or ``(n, 1 + views, dim)`` -- anything with ``len()`` and ``[a:b]``
    slicing that gives arrays (an ndarray, an ``np.memmap``, a lazy generator object); it is read
    one shard at a time, so it need not fit in memory. ``captions[i]``: image ``i``'s captions (a
    list of strings, or one string). ``tower``: the :class:`~littune.towers.image.ImageTower` (or
    spec) that the features belong to; its fingerprint, spec and preprocessing go in the manifest,
    so a trainer configured with that tower accepts the cache, and its output dim must equal
    ``dim``. ``keys`` default to ``"00000000"``, ``"00000001"``...; ``paths`` to the keys. The
    cache has no skipped images; rows with no (non-blank) caption are stored but not trainable (see
    :meth:`EmbeddingCache.trainable`). ``source_fingerprint`` defaults to a hash of the keys.
    ``langs[i]``: the languages of image ``i``'s captions, parallel to them (optional). ``tokens``: each
    image's token map, ``(n, h, w, F)`` or ``(n, h*w, F)`` with a square grid (read a shard at a time like
    ``features``), stored as float16 beside them (:mod:`.tokens`; pooling ``none``, ``exact`` False).
    """
    from ..towers.image import build_image_tower

    if dtype not in DTYPES:
        raise LittuneError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if shard_size < 1:
        raise LittuneError(f"shard_size must be >= 1, not {shard_size}")
    if not isinstance(tower, torch.nn.Module):
        tower = build_image_tower(tower)
    n, views, dim = _feature_shape(features, captions, tower)
    keys, paths = _keys_and_paths(keys, paths, n)
    if source_fingerprint is None:
        source_fingerprint = _keys_fingerprint(keys)
    plan = make_plan(tower, dim=dim, source_fingerprint=source_fingerprint, source=source, records=n,
                     shard_size=shard_size, dtype=dtype, views=views, seed=0, max_pixels=None,
                     tokens=_token_spec(tokens, n))
    out = Path(os.path.expanduser(str(out_dir)))
    held = lock(out)
    try:
        clear(out)
        (out / SHARD_DIR).mkdir(exist_ok=True)
        shards = _write_feature_shards(out, features, plan, tokens)
        flat, counts, flat_langs = _flat_captions(captions, n, langs)
        write_tables(out, plan, shards, keys, paths, flat, counts, np.arange(n, dtype=np.int64), caption_langs=flat_langs)
    finally:
        unlock(held)
    return EmbeddingCache.open(out, verify=False)


def _feature_shape(features, captions, tower) -> tuple[int, int, int]:
    """``(rows, views, dim)`` of ``features``, checked against the captions and the tower."""
    n = len(features)
    if len(captions) != n:
        raise LittuneError(f"{n} feature rows but {len(captions)} caption entries")
    if n == 0:
        raise LittuneError("no features to write")
    first = np.asarray(features[0:1])
    if first.ndim not in (2, 3):
        raise LittuneError(f"features must be (n, dim) or (n, 1 + views, dim), got rows of shape {first.shape[1:]}")
    dim = int(first.shape[-1])
    if dim != tower.dim:
        raise LittuneError(f"features are {dim}-d but the tower {tower.name} gives {tower.dim}-d outputs")
    return n, (first.shape[1] - 1 if first.ndim == 3 else 0), dim


def _keys_and_paths(keys, paths, n: int) -> tuple[list[str], list[str]]:
    keys = [f"{i:08d}" for i in range(n)] if keys is None else [str(k) for k in keys]
    paths = keys if paths is None else [str(p) for p in paths]
    if len(keys) != n or len(paths) != n:
        raise LittuneError(f"{n} feature rows but {len(keys)} keys and {len(paths)} paths")
    return keys, paths


def _keys_fingerprint(keys: Sequence[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8") + b"\0")
    return f"precomputed|{h.hexdigest()[:16]}"


def _token_spec(tokens, n: int) -> dict | None:
    """The token spec of precomputed ``tokens`` (None without), checked against the ``n`` feature rows."""
    if tokens is None:
        return None
    first = np.asarray(tokens[0:1])
    if len(tokens) != n or first.ndim not in (3, 4):
        raise LittuneError(f"tokens must be (n, h, w, F) or (n, h*w, F) for the {n} feature rows, got "
                           f"{len(tokens)} rows of shape {first.shape[1:]}")
    if first.ndim == 3:
        side = int(round(first.shape[1] ** 0.5))
        if side * side != first.shape[1]:
            raise LittuneError(f"{first.shape[1]} tokens per image are not a square grid: give (n, h, w, F)")
        grid = [side, side]
    else:
        grid = [int(first.shape[1]), int(first.shape[2])]
    return {"grid": grid, "dim": int(first.shape[-1]), "pool": "none", "exact": False,
            "how": "tokens computed elsewhere (write_cache)"}


def _write_feature_shards(out: Path, features, plan: dict, tokens=None) -> list[dict]:
    """Every shard of ``features`` (and ``tokens``), read and written one at a time; returns the manifest's
    shard list."""
    n, size, views, dim = plan["records"], plan["shard_size"], plan["views"], plan["dim"]
    np_dtype = np.float16 if plan["dtype"] == "float16" else np.float32
    phash, shards = plan_hash(plan), []
    for s in range(plan["shards"]):
        lo, hi = s * size, min(n, (s + 1) * size)
        arr = np.asarray(features[lo:hi], dtype=np.float32).reshape(hi - lo, 1 + views, dim)
        toks = None
        if tokens is not None:
            h, w = plan["tokens"]["grid"]
            toks = np.asarray(tokens[lo:hi], dtype=np.float32).reshape(hi - lo, h * w, plan["tokens"]["dim"])
        meta = write_shard(out, s, arr, np_dtype, phash, [lo, hi], list(range(hi - lo)), [],
                           overflow="features exceed the float16 range", fix="use dtype='float32'", tokens=toks)
        shards.append(manifest_entry(s, lo, meta))
    return shards


def _flat_captions(captions, n: int, langs=None) -> tuple[list[str], np.ndarray, list[str] | None]:
    """All captions in image order, the count of each image's (blank captions are dropped) and, with
    ``langs``, the language of each kept caption."""
    flat: list[str] = []
    flat_langs: list[str] | None = None if langs is None else []
    counts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        c = captions[i]
        c = [c] if isinstance(c, str) else list(c)
        keep = [k for k, x in enumerate(c) if str(x).strip()]
        flat.extend(c[k] for k in keep)
        if flat_langs is not None:
            if len(langs[i]) != len(c):
                raise LittuneError(f"image {i}: {len(c)} captions but {len(langs[i])} languages")
            flat_langs.extend(str(langs[i][k]) for k in keep)
        counts[i] = len(keep)
    return flat, counts, flat_langs
