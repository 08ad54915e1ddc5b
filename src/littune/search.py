"""Search an image collection by text or by image: an index of embeddings and exact top-k search.

``littune index`` embeds a collection once with a trained model and writes an **index directory**:

* ``embeddings.npy`` -- ``(N, D)`` float16, the model's L2-normalised image embeddings (tower, then
  the image head), in the collection's order;
* ``items.json`` -- ``{"keys": [...], "where": [...]}``: each image's key in its source and where it
  lives (a path, or ``shard.tar:key``), which is what search prints;
* ``index.json`` -- count, dimension, the model directory and its *embedding fingerprint* (image
  tower + image head: what makes the embeddings), the source and its fingerprint; written last, so
  a directory without it is an unfinished index;
* ``skipped.tsv`` -- images that could not be decoded, with the reason;
* optionally ``faiss.index``, an approximate FAISS index (``--faiss "IVF1024,Flat"``).

The image features come from the embedding cache machinery (:func:`littune.cache.embed_source`),
kept under ``INDEX/features/`` (or a cache you name), so an interrupted ``littune index`` resumes
and a second model with the same locked image tower re-uses the features.

**Search** (:func:`topk_search`) is brute force and exact: the database is scanned in chunks of
8192 rows (float16 converted to float32 into a reused buffer that stays in cache for the matmul),
``scores = queries @ chunk.T``, and the chunk's top k is kept (``torch.topk``); one last ``topk``
over the kept candidates gives the answer. Memory stays at one chunk whatever the collection size.
For a batch of 100 queries over 1M x 512 it takes 0.85-1.1x the time of one bare
``torch.topk(q @ db.T)`` over a float32 copy of the database (``benchmarks/search_speed.py``); a
single query is bound by the float16 conversion (about 1.8x the bare float32 matrix-vector product).
Results are sorted by descending score, equal scores by ascending index; which of several items
tied exactly at the k-th score makes the cut is not specified. Beyond a few million items the
optional FAISS backend (``pip install faiss-cpu``) searches ``faiss.index`` instead.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import LittuneError, StaleCacheError

INDEX_FORMAT = "littune-index"
INDEX_VERSION = 1
META_NAME = "index.json"
EMBEDDINGS_NAME = "embeddings.npy"
ITEMS_NAME = "items.json"
SKIPPED_NAME = "skipped.tsv"
FAISS_NAME = "faiss.index"
DEFAULT_CHUNK_ROWS = 8192  # 16 MB of float32 per chunk at 512-d: stays in cache between conversion and matmul


# ---------------------------------------------------------------------------------------------
# exact top-k
def _query_tensor(queries) -> torch.Tensor:
    q = queries.detach() if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    q = q.float().cpu()
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise LittuneError(f"queries must be (n, dim), got shape {tuple(q.shape)}")
    return q.contiguous()


def _rows(database, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a numpy array / memmap or tensor, as a tensor (no copy when possible)."""
    if isinstance(database, torch.Tensor):
        return database[start:stop]
    block = database[start:stop]
    with warnings.catch_warnings():  # read-only memory maps: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(block))


def topk_search(queries, database, k: int = 10, chunk_rows: int = DEFAULT_CHUNK_ROWS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product search: ``(scores (Q, k) float32, indices (Q, k) int64)``.

    ``database`` is an ``(N, D)`` numpy array (a memory map is fine), or a CPU tensor, float16 or
    float32; ``queries`` is ``(Q, D)`` (or ``(D,)``). ``k`` is capped at ``N``. Rows are sorted
    by descending score, ties by ascending index.
    """
    q = _query_tensor(queries)
    if getattr(database, "ndim", 0) != 2:
        raise LittuneError(f"the database must be (n, dim), got shape {tuple(getattr(database, 'shape', ()))}")
    n, d = int(database.shape[0]), int(database.shape[1])
    if q.shape[1] != d:
        raise LittuneError(f"queries are {q.shape[1]}-d but the index holds {d}-d embeddings")
    if k < 1:
        raise LittuneError(f"k must be at least 1, not {k}")
    k = min(int(k), n)
    nq = q.shape[0]
    if n == 0 or nq == 0:
        return torch.empty(nq, k), torch.empty(nq, k, dtype=torch.int64)
    chunk_rows = max(int(chunk_rows), 4 * k)  # keeps the candidates (chunks x k) a fraction of the rows
    dtype = database.dtype
    needs_cast = dtype not in (np.float32, torch.float32)
    buf = torch.empty(min(chunk_rows, n), d, dtype=torch.float32) if needs_cast else None
    scores = torch.empty(nq, min(chunk_rows, n), dtype=torch.float32)
    vals, idxs = [], []
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        m = stop - start
        rows = _rows(database, start, stop)
        if needs_cast:
            block = buf[:m]
            block.copy_(rows)
        else:
            block = rows
        s = scores[:, :m]
        torch.mm(q, block.T, out=s)
        v, i = torch.topk(s, min(k, m), dim=1, sorted=False)
        vals.append(v)
        idxs.append(i + start)
    # One merge at the end: (Q, chunks * k) candidates hold the exact top k.
    v, i = (vals[0], idxs[0]) if len(vals) == 1 else (torch.cat(vals, dim=1), torch.cat(idxs, dim=1))
    best_v, pos = torch.topk(v, k, dim=1, sorted=False)
    best_i = i.gather(1, pos)
    return _sort_hits(best_v, best_i)


def _sort_hits(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by descending score, ascending index among equal scores."""
    order = torch.argsort(i, dim=1)  # by index first, then a stable sort by score
    v, i = v.gather(1, order), i.gather(1, order)
    order = torch.argsort(-v, dim=1, stable=True)
    return v.gather(1, order).contiguous(), i.gather(1, order).contiguous()


# ---------------------------------------------------------------------------------------------
# fingerprints
def embedding_fingerprint(model) -> str:
    """What makes a model's image embeddings: the image tower (its fingerprint when locked, its
    weights otherwise), the image head's weights and the embedding size. The text tower is not
    part of it -- any model with the same image side can query the index."""
    from .hashing import hash_state_dict

    h = hashlib.sha256()
    if model.setting.image.locked:
        h.update(f"tower:{model.image_fingerprint}|".encode())
    else:
        h.update(f"tower-weights:{hash_state_dict(model.image_tower.state_dict())}|".encode())
    h.update(f"head:{hash_state_dict(model.image_head.state_dict())}|dim:{model.config.embed_dim}".encode())
    return "emb-" + h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    index: int
    key: str
    where: str


class SearchIndex:
    """An index directory opened for search (see the module docstring)."""

    def __init__(self, directory: Path, embeddings: np.ndarray, keys: list[str], where: list[str], meta: dict):
        self.directory = Path(directory)
        self.embeddings = embeddings
        self.keys = keys
        self.where = where
        self.meta = meta
        self._faiss = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path, mmap: bool = True) -> "SearchIndex":
        """Open an index written by :func:`build_index`; the embeddings are memory-mapped."""
        directory = Path(os.path.expanduser(str(directory)))
        if not directory.exists():
            raise LittuneError(f"index not found: {directory}")
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
        try:
            emb = np.load(directory / EMBEDDINGS_NAME, mmap_mode="r" if mmap else None, allow_pickle=False)
            items = json.loads((directory / ITEMS_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise LittuneError(f"index {directory} is incomplete: {Path(e.filename).name} is missing") from None
        except (ValueError, json.JSONDecodeError) as e:
            raise LittuneError(f"index {directory} is damaged: {e}") from None
        keys, where = items.get("keys", []), items.get("where", [])
        n = emb.shape[0]
        if emb.ndim != 2 or n != meta.get("count") or len(keys) != n or len(where) != n:
            raise LittuneError(f"index {directory} is inconsistent: {emb.shape[0]} embeddings, {len(keys)} keys, "
                               f"count {meta.get('count')} in {META_NAME}")
        return cls(directory, emb, keys, where, meta)

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

    def load_model(self, model_dir: str | Path | None = None):
        """The model to embed queries with (``model_dir`` or the recorded one), checked against the index."""
        from .model import LiTModel

        path = model_dir or self.model_dir
        if not path:
            raise LittuneError(f"index {self.directory} does not record its model; give --model DIR")
        if not Path(path).exists():
            raise LittuneError(f"model directory {path} (recorded in {self.directory / META_NAME}) not found; "
                               "give --model DIR")
        model = LiTModel.from_pretrained(path)
        self.check_model(model)
        return model

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
            _import_faiss()
            return "faiss"
        if requested != "auto":
            raise LittuneError(f"unknown search backend {requested!r}; use auto, exact or faiss")
        if has:
            try:
                _import_faiss()
                return "faiss"
            except LittuneError:
                return "exact"
        return "exact"

    def search(self, queries, k: int = 10, backend: str = "auto", nprobe: int | None = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores, indices)`` for ``(Q, D)`` query embeddings (normalise them first)."""
        q = _query_tensor(queries)
        if q.shape[1] != self.dim:
            raise LittuneError(f"queries are {q.shape[1]}-d but index {self.directory} holds {self.dim}-d embeddings")
        if self.backend(backend) == "faiss":
            return self._faiss_search(q, k, nprobe)
        return topk_search(q, self.embeddings, k=k, chunk_rows=chunk_rows)

    def _faiss_search(self, q: torch.Tensor, k: int, nprobe: int | None):
        faiss = _import_faiss()
        if self._faiss is None:
            self._faiss = faiss.read_index(str(self.directory / FAISS_NAME))
        if nprobe is not None and hasattr(self._faiss, "nprobe"):
            self._faiss.nprobe = int(nprobe)
        elif nprobe is not None:
            try:
                faiss.extract_index_ivf(self._faiss).nprobe = int(nprobe)
            except RuntimeError:
                pass
        k = min(int(k), len(self))
        scores, idx = self._faiss.search(np.ascontiguousarray(q.numpy(), dtype=np.float32), k)
        return torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64))

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


def _import_faiss():
    try:
        import faiss  # type: ignore
    except ImportError:
        raise LittuneError("the FAISS backend needs faiss-cpu: pip install faiss-cpu") from None
    return faiss


# ---------------------------------------------------------------------------------------------
# building
def _features_from_cache(model, source, cache_dir: Path, batch_size: int, workers: int | None, progress: bool,
                         fresh: bool = False):
    """Run (or resume) the embedding cache of ``source`` with the model's image tower; returns it open."""
    from .cache import embed_source

    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
    if workers is not None:
        kwargs["workers"] = workers
    try:
        return embed_source(source, model.image_tower, cache_dir, **kwargs)
    except LittuneError:
        if not fresh:
            raise
        # --overwrite with the index's own features folder: features of another tower are replaced.
        return embed_source(source, model.image_tower, cache_dir, resume=False, **kwargs)


def _cache_available() -> bool:
    try:
        from .cache import EmbeddingCache, embed_source  # noqa: F401
    except ImportError:
        return False
    return True


def build_index(model, source, out_dir: str | Path, *, model_dir: str | Path | None = None,
                cache_dir: str | Path | None = None, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, faiss_factory: str | None = None, overwrite: bool = False) -> SearchIndex:
    """Embed every image of ``source`` (a path / spec for :func:`open_source`, or a Source) with
    ``model`` and write an index directory ``out_dir``; returns it opened.

    Features go through the embedding cache (``cache_dir``, default ``out_dir/features``) when
    :mod:`littune.cache` is available, which makes a re-run resume; otherwise images are embedded
    directly. Images that fail to decode are skipped and listed in ``skipped.tsv``. ``faiss_factory``
    (e.g. ``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32"``) also writes a FAISS index.
    """
    from .data.sources import open_source
    from .inference import embed_images, evaluating, model_device

    out = Path(os.path.expanduser(str(out_dir)))
    if (out / META_NAME).exists() and not overwrite:
        raise LittuneError(f"{out} already holds an index; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LittuneError(f"--out {out} is a file, not a directory")
    if faiss_factory:
        _faiss_index(faiss_factory, model.config.embed_dim)  # a bad factory fails before any work
    src = open_source(source)
    records = src.records()
    if not records:
        raise LittuneError(f"{src.describe()} holds no images")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)
    dim = model.config.embed_dim
    tmp = out / (EMBEDDINGS_NAME + ".tmp")
    skipped: list[tuple[str, str]] = [(w, r) for w, r in src.problems]
    if _cache_available():
        feats_dir = Path(cache_dir) if cache_dir else out / "features"
        cache = _features_from_cache(model, src, feats_dir, batch_size, workers, progress,
                                     fresh=overwrite and cache_dir is None)
        n = len(cache)
        keys = [cache.key(i) for i in range(n)]
        where = [cache.path(i) for i in range(n)]
        skipped = [(w, f"{r}: {d}" if d else r) for w, r, d in cache.skipped()]  # source problems included
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        device = model_device(model)
        step = 8192
        with evaluating(model):
            for s in range(0, n, step):
                f = np.ascontiguousarray(cache.features(np.arange(s, min(s + step, n))), dtype=np.float32)
                arr[s:s + len(f)] = model.embed_image_features(torch.from_numpy(f).to(device)).float().cpu().numpy()
        arr.flush()
        del arr
        feature_source = str(feats_dir)
    else:
        emb, kept, bad = embed_images(model, records, batch_size=batch_size, workers=workers, progress=progress,
                                      skip_bad=True)
        keys = [records[i].key for i in kept]
        where = [records[i].where for i in kept]
        skipped += bad
        with open(tmp, "wb") as f:
            np.save(f, emb.numpy().astype(np.float16), allow_pickle=False)
        feature_source = None
    if not keys:
        tmp.unlink(missing_ok=True)
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise LittuneError(f"no image of {src.describe()} could be embedded ({len(skipped)} skipped{first})")
    os.replace(tmp, out / EMBEDDINGS_NAME)
    _write_json(out / ITEMS_NAME, {"keys": keys, "where": where})
    with open(out / SKIPPED_NAME, "w", encoding="utf-8") as f:
        f.write("where\treason\n")
        for w, r in skipped:
            f.write("\t".join(" ".join(str(x).split()) for x in (w, r)) + "\n")
    if faiss_factory:
        _write_faiss(out, faiss_factory, progress)
    else:
        (out / FAISS_NAME).unlink(missing_ok=True)
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "count": len(keys),
        "dim": dim,
        "dtype": "float16",
        "normalized": True,
        "model": {"path": str(Path(model_dir).resolve()) if model_dir else None,
                  "fingerprint": embedding_fingerprint(model),
                  "image_fingerprint": model.image_fingerprint},
        "source": {"describe": src.describe(), "fingerprint": src.fingerprint()},
        "features": feature_source,
        "skipped": len(skipped),
        "faiss": faiss_factory or None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    from . import __version__

    meta["littune"] = __version__
    _write_json(out / META_NAME, meta)  # last: its presence marks a complete index
    return SearchIndex.open(out)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=None if path.name == ITEMS_NAME else 2),
                   encoding="utf-8")
    os.replace(tmp, path)


def _faiss_index(factory: str, dim: int):
    """An empty FAISS index (inner product) from an index-factory string."""
    faiss = _import_faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise LittuneError(f"FAISS cannot build {factory!r}: {str(e).strip().splitlines()[-1]}") from None


def _write_faiss(out: Path, factory: str, progress: bool) -> None:
    faiss = _import_faiss()
    emb = np.load(out / EMBEDDINGS_NAME, mmap_mode="r")
    n, d = emb.shape
    index = _faiss_index(factory, d)
    step = 65536
    if not index.is_trained:  # train on up to 256k rows spread evenly over the collection
        rows = np.unique(np.linspace(0, n - 1, min(n, 256 * 1024)).astype(np.int64))
        sample = np.ascontiguousarray(emb[rows], dtype=np.float32)
        if progress:
            print(f"training FAISS {factory} on {len(sample):,} vectors", file=sys.stderr)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise LittuneError(f"FAISS cannot train {factory!r} on {len(sample)} vectors: "
                               f"{str(e).strip().splitlines()[-1]}") from None
    for s in range(0, n, step):
        index.add(np.ascontiguousarray(emb[s:s + step], dtype=np.float32))
    tmp = out / (FAISS_NAME + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / FAISS_NAME)
