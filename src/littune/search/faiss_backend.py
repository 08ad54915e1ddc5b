"""The optional approximate backend: a FAISS index (``faiss.index``) next to the exact embeddings.

Beyond a few million items, ``littune index --faiss FACTORY`` also builds a FAISS index over the
embeddings with inner-product metric (``pip install faiss-cpu``); ``SearchIndex.search`` uses it
with backend ``faiss`` (or ``auto`` when it is there and faiss imports).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import LittuneError
from ..fileio import atomic_write

TRAIN_ROWS = 256 * 1024  # an untrained index (IVF...) learns from up to this many rows
ADD_ROWS = 65536


def import_faiss():
    """The ``faiss`` module, or a :class:`LittuneError` that says how to install it."""
    try:
        import faiss  # type: ignore
    except ImportError:
        raise LittuneError("the FAISS backend needs faiss-cpu: pip install faiss-cpu") from None
    return faiss


def faiss_index(factory: str, dim: int):
    """An empty FAISS index (inner product) from an index-factory string."""
    faiss = import_faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise LittuneError(f"FAISS cannot build {factory!r}: {str(e).strip().splitlines()[-1]}") from None


def write_faiss(embeddings: np.ndarray, path: Path, factory: str, progress: bool) -> None:
    """Build a ``factory`` index over ``embeddings`` (trained on rows spread evenly over the
    collection when the kind needs training) and write it to ``path`` atomically."""
    faiss = import_faiss()
    n, d = embeddings.shape
    index = faiss_index(factory, d)
    if not index.is_trained:
        rows = np.unique(np.linspace(0, n - 1, min(n, TRAIN_ROWS)).astype(np.int64))
        sample = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
        if progress:
            print(f"training FAISS {factory} on {len(sample):,} vectors", file=sys.stderr)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise LittuneError(f"FAISS cannot train {factory!r} on {len(sample)} vectors: "
                               f"{str(e).strip().splitlines()[-1]}") from None
    for s in range(0, n, ADD_ROWS):
        index.add(np.ascontiguousarray(embeddings[s:s + ADD_ROWS], dtype=np.float32))
    atomic_write(path, faiss.serialize_index(index).tobytes())


def faiss_search(index, q: torch.Tensor, k: int, nprobe: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ``(scores, indices)`` from an open FAISS ``index`` (``-1`` where it found fewer than k)."""
    faiss = import_faiss()
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    elif nprobe is not None:
        try:
            faiss.extract_index_ivf(index).nprobe = int(nprobe)
        except RuntimeError:
            pass
    k = min(int(k), index.ntotal)
    scores, idx = index.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
    return torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64))

