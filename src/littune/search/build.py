"""Writing an index directory: embed a collection once, then publish its files, ``index.json`` last.

The image features come from the embedding cache machinery (:func:`littune.cache.embed_source`),
kept under ``INDEX/features/`` (or a cache you name), so an interrupted ``littune index`` resumes
and a second model with the same locked image tower re-uses the features; the model's image head
turns them into the embeddings. Every file is written atomically (:mod:`littune.fileio`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LittuneError
from ..fileio import atomic_write, write_json, write_npy, write_skipped
from .faiss_backend import faiss_index, write_faiss
from .index import (EMBEDDINGS_NAME, FAISS_NAME, INDEX_FORMAT, INDEX_VERSION, ITEMS_NAME, META_NAME, SKIPPED_NAME,
                    SearchIndex, embedding_fingerprint)
from .originals import record_positions, source_spec

HEAD_ROWS = 8192  # cached features put through the image head at a time


@dataclass
class _Embedded:
    """What embedding a collection gave: the rows kept (in order), what was skipped, where features live."""

    keys: list[str]
    where: list[str]
    skipped: list[tuple] = field(default_factory=list)
    features: str | None = None
    reuse: Any = None  # what embedding the features reused (a littune.cache.reuse.Report), when they were embedded


def build_index(model, source, out_dir: str | Path, *, model_dir: str | Path | None = None,
                cache_dir: str | Path | None = None, batch_size: int = 64, workers: int | None = None,
                progress: bool = True, faiss_factory: str | None = None, overwrite: bool = False,
                allow_stale_cache: bool = False, reuse: bool = True) -> SearchIndex:
    """Embed every image of ``source`` (a path / spec for :func:`open_source`, or a Source) with
    ``model`` and write an index directory ``out_dir``; returns it opened.

    Features go through the embedding cache (``cache_dir``, default ``out_dir/features``) when
    :mod:`littune.cache` is available, which makes a re-run resume; otherwise images are embedded
    directly. Images that fail to decode are skipped and listed in ``skipped.tsv``. ``faiss_factory``
    (e.g. ``"Flat"``, ``"IVF1024,Flat"``, ``"HNSW32"``) also writes a FAISS index. A complete cache named by
    ``cache_dir`` must hold the model's image tower's features of this source (other images under the same
    names are another source) and is then used as it is: :class:`~littune.errors.StaleCacheError` otherwise,
    or, with ``allow_stale_cache``, a warning and the cached features of the source's images, by key.
    ``reuse``: images whose features another cache holds (the same files, tower and runtime) are copied from
    it, not embedded again (see :mod:`littune.cache.reuse`); the returned index's ``reuse`` says what was.
    """
    from ..data.sources import open_source

    out = _prepare_out(out_dir, overwrite, faiss_factory, model.config.embed_dim)
    src = open_source(source)
    records = src.records()
    if not records:
        raise LittuneError(f"{src.describe()} holds no images")
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)
    emb_path = out / EMBEDDINGS_NAME
    if _cache_available():
        feats_dir = Path(cache_dir) if cache_dir else out / "features"
        done = _embed_through_cache(model, src, feats_dir, emb_path, batch_size, workers, progress,
                                    fresh=overwrite and cache_dir is None,
                                    allow_stale=allow_stale_cache if cache_dir else None, reuse=reuse)
    else:
        done = _embed_directly(model, src, emb_path, batch_size, workers, progress)
    _write_items(out, done, record_positions(records, done.keys))
    write_skipped(out / SKIPPED_NAME, done.skipped)
    if faiss_factory:
        write_faiss(np.load(emb_path, mmap_mode="r"), out / FAISS_NAME, faiss_factory, progress)
    else:
        (out / FAISS_NAME).unlink(missing_ok=True)
    write_json(out / META_NAME, _index_meta(model, model_dir, src, done, faiss_factory))  # last: marks it complete
    index = SearchIndex.open(out)
    index.reuse = done.reuse
    return index


def _prepare_out(out_dir: str | Path, overwrite: bool, faiss_factory: str | None, dim: int) -> Path:
    """The output folder, refused if it holds an index (without ``overwrite``) or is a file."""
    out = Path(os.path.expanduser(str(out_dir)))
    if (out / META_NAME).exists() and not overwrite:
        raise LittuneError(f"{out} already holds an index; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LittuneError(f"--out {out} is a file, not a directory")
    if faiss_factory:
        faiss_index(faiss_factory, dim)  # a bad factory fails before any work
    return out


def _cache_available() -> bool:
    try:
        from ..cache import EmbeddingCache, embed_source  # noqa: F401
    except ImportError:
        return False
    return True


def _features_from_cache(model, source, cache_dir: Path, batch_size: int, workers: int | None, progress: bool,
                         fresh: bool = False, reuse: bool = True):
    """Run (or resume) the embedding cache of ``source`` with the model's image tower; returns it open."""
    from ..cache import embed_source
    from ..model.heads import token_request

    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "reuse": reuse,
                              "tokens": token_request(model)}  # the attention image head reads tokens
    if workers is not None:
        kwargs["workers"] = workers
    try:
        return embed_source(source, model.image_tower, cache_dir, **kwargs)
    except LittuneError:
        if not fresh:
            raise
        # --overwrite with the index's own features folder: features of another tower are replaced.
        return embed_source(source, model.image_tower, cache_dir, resume=False, **kwargs)


def _named_cache(model, src, cache_dir: Path, allow_stale: bool | None):
    """A complete cache the user named, checked against the model's image fingerprint (the one it was
    trained on: a saved hf: tower is rebuilt under another name) and the source: ``(cache, stale)`` to
    use as it is, None to run ``embed_source`` (no manifest yet, or ``allow_stale`` None: the index's own
    folder), :class:`~littune.errors.StaleCacheError` when stale without ``allow_stale``."""
    from ..cache import MANIFEST, EmbeddingCache

    if allow_stale is None or not (cache_dir / MANIFEST).is_file():
        return None
    cache = EmbeddingCache.open(cache_dir)
    return cache, cache.check(tower_fingerprint=model.image_fingerprint, source_fingerprint=src.fingerprint(),
                              allow_stale=allow_stale)


def _embed_through_cache(model, src, feats_dir: Path, emb_path: Path, batch_size: int, workers: int | None,
                         progress: bool, fresh: bool, allow_stale: bool | None = None, reuse: bool = True) -> _Embedded:
    """The tower's features from the cache, through the image head, streamed into ``embeddings.npy``."""
    from ..inference.embeddings import cached_image_embedding_batches

    cache, stale = _named_cache(model, src, feats_dir, allow_stale) or (None, False)
    if not stale:
        cache = cache or _features_from_cache(model, src, feats_dir, batch_size, workers, progress, fresh=fresh,
                                              reuse=reuse)
        rows = list(range(len(cache)))  # the cache's report (skipped) includes the source's problems
        done = _Embedded([cache.key(i) for i in rows], [cache.path(i) for i in rows],
                         list(cache.skipped()), str(feats_dir), cache.reuse)
    else:  # a stale cache used anyway: the source's images it holds a row for, by key
        by_key = {r.key: r for r in src.records()}
        rows = [i for i in range(len(cache)) if cache.key(i) in by_key]
        held = {cache.key(i) for i in rows}
        done = _Embedded([cache.key(i) for i in rows], [by_key[cache.key(i)].where for i in rows],
                         [*src.problems, *((r.where, "not in the cache", str(feats_dir)) for r in by_key.values()
                                           if r.key not in held)], str(feats_dir))
    n, dim = len(rows), model.config.embed_dim
    _refuse_empty(src, done)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                 "shape": (n, dim)})
        for _, emb in cached_image_embedding_batches(model, cache, rows, batch_size=HEAD_ROWS):
            f.write(emb.numpy().astype(np.float16).tobytes())

    atomic_write(emb_path, write)
    return done


def _embed_directly(model, src, emb_path: Path, batch_size: int, workers: int | None, progress: bool) -> _Embedded:
    """Without the cache: decode and embed every record in memory."""
    from ..inference.embeddings import image_embeddings

    records = src.records()
    emb, kept, bad = image_embeddings(model, records, batch_size=batch_size, workers=workers, progress=progress,
                                  skip_bad=True)
    done = _Embedded([records[i].key for i in kept], [records[i].where for i in kept], [*src.problems, *bad])
    _refuse_empty(src, done)
    write_npy(emb_path, emb.numpy().astype(np.float16))
    return done


def _refuse_empty(src, done: _Embedded) -> None:
    if not done.keys:
        first = f"; first: {': '.join(str(x) for x in done.skipped[0] if x)}" if done.skipped else ""
        raise LittuneError(f"no image of {src.describe()} could be embedded ({len(done.skipped)} skipped{first})")


def _write_items(out: Path, done: _Embedded, positions: list[int]) -> None:
    """``items.json``, compact (one line: it grows with the collection)."""
    items = {"keys": done.keys, "where": done.where, "positions": positions}
    atomic_write(out / ITEMS_NAME, json.dumps(items, ensure_ascii=False))


def _index_meta(model, model_dir, src, done: _Embedded, faiss_factory: str | None) -> dict:
    from .. import __version__

    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "count": len(done.keys),
        "dim": model.config.embed_dim,
        "dtype": "float16",
        "normalized": True,
        "model": {"path": str(Path(model_dir).resolve()) if model_dir else None,
                  "fingerprint": embedding_fingerprint(model),
                  "image_fingerprint": model.image_fingerprint},
        "source": {"describe": src.describe(), "fingerprint": src.fingerprint(), "spec": source_spec(src)},
        "features": done.features,
        "skipped": len(done.skipped),
        "faiss": faiss_factory or None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "littune": __version__,
    }
