"""The index directory -- its files, and the index opened for search.

``littune index`` (:func:`littune.search.build_index`) writes, in one directory:

* ``embeddings.npy`` -- ``(N, D)`` float16, the model's L2-normalised image embeddings (tower, then
  the image head), in the collection's order;
* ``items.json`` -- ``{"keys": [...], "where": [...], "positions": [...]}``: each image's key in its
  source, where it lives (a path, or ``shard.tar:key``: what search prints) and its position in the
  source's records (what re-opens it, see :mod:`littune.search.originals`);
* ``index.json`` -- count, dimension, the model directory and its *embedding fingerprint* (image
  tower + image head: what makes the embeddings), the source (its description, fingerprint and a
  spec that re-opens it); written last, so a directory without it is an unfinished index;
* ``skipped.tsv`` -- images that could not be decoded (``where, reason, detail``);
* optionally ``faiss.index``, an approximate FAISS index (``--faiss "IVF1024,Flat"``).

Indexes written before ``positions`` and the source spec existed open as before; their previews
are found from ``where``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..errors import LittuneError, StaleCacheError
from .faiss_backend import faiss_search, import_faiss
from .originals import Originals
from .topk import DEFAULT_CHUNK_ROWS, query_tensor, topk_search

INDEX_FORMAT = "littune-index"
INDEX_VERSION = 1
META_NAME = "index.json"
EMBEDDINGS_NAME = "embeddings.npy"
ITEMS_NAME = "items.json"
SKIPPED_NAME = "skipped.tsv"
FAISS_NAME = "faiss.index"


def embedding_fingerprint(model) -> str:
    """What makes a model's image embeddings: the image tower (its fingerprint when locked, its
    weights otherwise), the image head's weights and the embedding size. The text tower is not
    part of it -- any model with the same image side can query the index."""
    from ..hashing import hash_state_dict

    h = hashlib.sha256()
    if model.setting.image.locked:
        h.update(f"tower:{model.image_fingerprint}|".encode())
    else:
        h.update(f"tower-weights:{hash_state_dict(model.image_tower.state_dict())}|".encode())
    h.update(f"head:{hash_state_dict(model.image_head.state_dict())}|dim:{model.config.embed_dim}".encode())
    return "emb-" + h.hexdigest()[:24]


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    index: int
    key: str
    where: str


def _read_meta(directory: Path) -> dict:
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise LittuneError(f"{directory} is not a littune index (no {META_NAME}; "
                           "an interrupted `littune index` leaves none: run it again)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LittuneError(f"{meta_path} is not valid JSON ({e.msg})") from None
    if meta.get("format") != INDEX_FORMAT:
        raise LittuneError(f"{meta_path} is not a littune index file")
    if meta.get("version", 0) > INDEX_VERSION:
        raise LittuneError(f"{directory} was written by a newer littune (index version {meta['version']})")
    return meta


def _read_rows(directory: Path, mmap: bool) -> tuple[np.ndarray, dict]:
    try:
        emb = np.load(directory / EMBEDDINGS_NAME, mmap_mode="r" if mmap else None, allow_pickle=False)
        items = json.loads((directory / ITEMS_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise LittuneError(f"index {directory} is incomplete: {Path(e.filename).name} is missing") from None
    except (ValueError, json.JSONDecodeError) as e:
        raise LittuneError(f"index {directory} is damaged: {e}") from None
    return emb, items


class SearchIndex:
    """An index directory opened for search (see the module docstring)."""

    def __init__(self, directory: Path, embeddings: np.ndarray, keys: list[str], where: list[str], meta: dict,
                 positions: Sequence[int] | None = None):
        self.directory = Path(directory)
        self.embeddings = embeddings
        self.keys = keys
        self.where = where
        self.meta = meta
        self.originals = Originals(keys, where, (meta.get("source") or {}).get("spec"), positions)
        self._faiss = None
        #: set by :func:`~littune.search.build_index`: what embedding the features reused from other caches
        self.reuse = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, mmap: bool = True) -> "SearchIndex":
        """Open an index written by :func:`build_index`; the embeddings are memory-mapped."""
        directory = Path(os.path.expanduser(str(directory)))
        if not directory.exists():
            raise LittuneError(f"index not found: {directory}")
        meta = _read_meta(directory)
        emb, items = _read_rows(directory, mmap)
        keys, where, positions = items.get("keys", []), items.get("where", []), items.get("positions")
        n = emb.shape[0]
        if emb.ndim != 2 or n != meta.get("count") or len(keys) != n or len(where) != n:
            raise LittuneError(f"index {directory} is inconsistent: {emb.shape[0]} embeddings, {len(keys)} keys, "
                               f"count {meta.get('count')} in {META_NAME}")
        return cls(directory, emb, keys, where, meta, positions)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def model_dir(self) -> str | None:
        """The model directory the index was built with (as recorded)."""
        return self.meta.get("model", {}).get("path")

    def check_model(self, model) -> None:
        """Raise :class:`StaleCacheError` unless ``model`` makes the embeddings this index holds."""
        want = self.meta.get("model", {}).get("fingerprint")
        found = embedding_fingerprint(model)
        if want != found:
            raise StaleCacheError(f"index {self.directory} was built with image embeddings {want}, but this model "
                                  f"makes {found}: use the model it was built with or rebuild the index")

    def load_model(self, model_dir: str | Path | None = None, trust_code: bool = False):
        """The model to embed queries with (``model_dir`` or the recorded one), checked against the index.
        ``trust_code``: as :meth:`~littune.model.LiTModel.from_pretrained`'s (the recorded folder is data too)."""
        from ..model.two_towers import LiTModel

        path = model_dir or self.model_dir
        if not path:
            raise LittuneError(f"index {self.directory} does not record its model; give --model DIR")
        if not Path(path).exists():
            raise LittuneError(f"model directory {path} (recorded in {self.directory / META_NAME}) not found; "
                               "give --model DIR")
        model = LiTModel.from_pretrained(path, trust_code=trust_code)
        self.check_model(model)
        return model

    def open_image(self, i: int, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """Decode the image of row ``i`` again, through its source's record (a PIL RGB image).

        Raises :class:`LittuneError` if the source no longer holds it and
        :class:`~littune.data.decode.BadImage` if it no longer decodes."""
        return self.originals.record(i).open(max_pixels=max_pixels)

    # -- searching ----------------------------------------------------------------------------
    def backend(self, requested: str = "auto") -> str:
        """``exact`` or ``faiss`` for a requested ``auto`` / ``exact`` / ``faiss``."""
        has = (self.directory / FAISS_NAME).is_file()
        if requested == "exact":
            return "exact"
        if requested == "faiss":
            if not has:
                raise LittuneError(f"index {self.directory} has no FAISS index "
                                   "(build one with littune index --faiss FACTORY)")
            import_faiss()
            return "faiss"
        if requested != "auto":
            raise LittuneError(f"unknown search backend {requested!r}; use auto, exact or faiss")
        if has:
            try:
                import_faiss()
                return "faiss"
            except LittuneError:
                return "exact"
        return "exact"

    def search(self, queries, k: int = 10, backend: str = "auto", nprobe: int | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores, indices)`` for ``(Q, D)`` query embeddings (normalise them first)."""
        q = query_tensor(queries)
        if q.shape[1] != self.dim:
            raise LittuneError(f"queries are {q.shape[1]}-d but index {self.directory} holds {self.dim}-d embeddings")
        if self.backend(backend) == "faiss":
            if self._faiss is None:
                self._faiss = import_faiss().read_index(str(self.directory / FAISS_NAME))
            return faiss_search(self._faiss, q, k, nprobe)
        return topk_search(q, self.embeddings, k=k, chunk_rows=chunk_rows)

    def hits(self, scores: torch.Tensor, indices: torch.Tensor) -> list[list[Hit]]:
        """Turn search output into :class:`Hit` lists (FAISS's ``-1`` fillers are dropped)."""
        out = []
        for srow, irow in zip(scores.tolist(), indices.tolist()):
            out.append([Hit(r + 1, float(s), int(i), self.keys[i], self.where[i])
                        for r, (s, i) in enumerate((s, i) for s, i in zip(srow, irow) if i >= 0)])
        return out

    def search_text(self, model, texts: Sequence[str] | str, k: int = 10, backend: str = "auto") -> list[list[Hit]]:
        """The ``k`` images closest to each text query."""
        emb = model.encode_texts([texts] if isinstance(texts, str) else list(texts))
        return self.hits(*self.search(emb, k=k, backend=backend))

    def search_image(self, model, images: Sequence[Any] | Any, k: int = 10, backend: str = "auto") -> list[list[Hit]]:
        """The ``k`` images closest to each query image (a path or a PIL image)."""
        emb = model.encode_images(images)
        return self.hits(*self.search(emb, k=k, backend=backend))
