"""Reading a cache: :class:`EmbeddingCache`, features by index, captions, keys -- with ``pread`` only.

The reader keeps at most ``max_open`` shard files open and reads rows with ``pread`` (no memory
map: touched pages of a map would count in the process's RSS; :mod:`.pread`), so memory stays constant
whatever the cache size and however many rows have been read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LittuneError
from ..fileio import read_skipped
from ..train.sampling import pick_caption
from .format import FORMAT, LANGS_FILE, MANIFEST, NO_CAPTION, PLAN, SKIPPED, VERSION, sha256
from .pread import OpenFiles, _Npy, _Strings, image_rows, shard_runs
from .tokens import TokenRows, shard_files


def default_max_open() -> int:
    """Shard files a reader keeps open: a quarter of the open-file limit, between 16 and 1024.

    Random batches touch most shards at every step; a shard that is not open costs an ``open()``
    (1024 open shards of the default 2048 rows cover a 2M-image cache)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 128
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


class EmbeddingCache(TokenRows):
    """Read a cache written by :func:`embed_source`: features by index, captions, keys (tokens: :mod:`.tokens`).

    Everything is read with positional reads (``pread``) from at most ``max_open`` open shard files:
    the process's memory stays the same whatever the cache's size and however long it is read.
    """

    def __init__(self, directory: str | Path, manifest: dict, max_open: int | None = None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.dtype: str = manifest["dtype"]
        self.views: int = int(manifest["views"])
        self.tower_fingerprint: str = manifest["tower_fingerprint"]
        self.source_fingerprint: str = manifest["source_fingerprint"]
        self._count = int(manifest["count"])
        self._shards = [s for s in manifest["shards"] if s["count"] > 0]
        self._starts = np.asarray([s["start"] for s in self._shards], dtype=np.int64)
        self.max_open = max(1, int(default_max_open() if max_open is None else max_open))
        self._open = OpenFiles(self.max_open)  # the feature shards open now
        self._known: dict[int, _Npy] = {}  # shards opened before (a few hundred bytes each)
        d = self.directory
        self._keys = _Strings(d / "keys.utf8", d / "key_offsets.npy")
        self._paths = _Strings(d / "paths.utf8", d / "path_offsets.npy")
        self._captions = _Strings(d / "captions.utf8", d / "caption_offsets.npy")
        self._image_captions = _Npy(d / "image_captions.npy")
        #: the caption languages the source named (``None``: it named none); see :meth:`caption_languages`
        self.languages: list[str] | None = manifest.get("languages")
        self._caption_langs = _Npy(d / LANGS_FILE) if self.languages is not None else None
        #: set by :func:`~littune.cache.embed_source`: what that call embedded and what it copied from other
        #: caches (a :class:`~littune.cache.reuse.Report`); None for a cache opened otherwise
        self.reuse = None

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True, max_open: int | None = None) -> "EmbeddingCache":
        """Open a cache; ``verify`` checks every file's sha256 against the manifest (reads it all once).
        ``max_open``: shard files kept open (default :func:`default_max_open`)."""
        d = Path(os.path.expanduser(str(directory)))
        mf = d / MANIFEST
        if not mf.is_file():
            hint = " (an interrupted `littune embed`: run it again to finish)" if (d / PLAN).exists() else ""
            raise LittuneError(f"{d} is not an embedding cache: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(mf.read_text())
        except ValueError as e:
            raise LittuneError(f"{mf} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise LittuneError(f"{mf} is not a littune embedding cache manifest")
        if manifest.get("version", 0) > VERSION:
            raise LittuneError(f"{d} was written by a newer littune (cache format {manifest['version']})")
        for file, size, digest in (f for s in manifest["shards"] for f in shard_files(s)):
            p = d / file
            if not p.is_file():
                raise LittuneError(f"embedding cache {d} is incomplete: {file} is missing")
            if p.stat().st_size != size or (verify and sha256(p) != digest):
                raise LittuneError(f"embedding cache {d} is corrupt: {file} does not match its checksum; "
                                   "re-run `littune embed` (it redoes only the damaged shards)")
        for name, digest in manifest.get("files", {}).items():
            p = d / name
            if not p.is_file() or (verify and sha256(p) != digest):
                raise LittuneError(f"embedding cache {d} is corrupt: {name} is missing or does not match its checksum")
        return cls(d, manifest, max_open=max_open)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.directory)!r}, {self._count} images, {self.dim}-d {self.dtype}, "
                f"views={self.views})")

    # -- features --------------------------------------------------------------------------------
    def _shard(self, j: int) -> _Npy:
        return self._open.get(j, lambda: self._open_shard(j))

    def _open_shard(self, j: int) -> _Npy:
        # Reopening a shard is one open(): its header is parsed and checked the first time only.
        known = self._known.get(j)
        if known is not None:
            return known.reopen()
        f = _Npy(self.directory / self._shards[j]["file"])
        want = (self._shards[j]["count"], 1 + self.views, self.dim)
        if f.shape != want or f.dtype != np.dtype(self.dtype):
            f.close()
            raise LittuneError(f"{f.path} holds {f.dtype}{list(f.shape)}, the manifest says "
                               f"{self.dtype}{list(want)}: re-run `littune embed`")
        self._known[j] = f
        return f

    def features(self, indices: Sequence[int] | np.ndarray, view: int | np.ndarray | None = None) -> np.ndarray:
        """``(n, dim)`` float32 features of images ``indices``: the eval view (``view=None``), or
        augmented view ``view`` (an int, or one per row; 0-based, ``< views``).

        Rows are read in index order, one read per run of consecutive images (a random batch: one
        small read per row; a range: one read per shard)."""
        idx = image_rows(indices, self._count)
        if view is None:
            slot = np.zeros(len(idx), dtype=np.int64)
        else:
            v = np.asarray(view, dtype=np.int64)
            if v.ndim == 0:
                v = np.full(len(idx), int(v), dtype=np.int64)
            elif v.shape != idx.shape:
                raise ValueError(f"view has shape {v.shape}; give one view per index ({idx.shape})")
            if v.size and (v.min() < 0 or v.max() >= self.views):
                raise IndexError(f"view {int(v.max() if v.max() >= self.views else v.min())} out of range: "
                                 f"this cache stores {self.views} augmented view(s)"
                                 + (" (embed with --views K)" if self.views == 0 else ""))
            slot = v + 1
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if not len(idx):
            return out
        order, runs = shard_runs(idx, self._starts)
        sslot = slot[order]
        slot_l = sslot.tolist()
        stored = np.empty((len(idx), self.dim), dtype=np.dtype(self.dtype))
        for a, b, j, local in runs:
            f = self._shard(j)
            if b - a == 1:  # one row: read just its slot
                f.read_into(stored[a], f.offset + (local * (1 + self.views) + slot_l[a]) * self.dim * f.dtype.itemsize)
            elif self.views == 0:
                f.rows(local, local + b - a, out=stored[a:b].reshape(b - a, 1, self.dim))
            else:
                block = f.rows(local, local + b - a)
                stored[a:b] = block[np.arange(b - a), sslot[a:b]]
        out[order] = stored
        return out

    # -- metadata ----------------------------------------------------------------------------------
    def captions(self, i: int) -> list[str]:
        """All captions of image ``i``."""
        a, b = self._image_captions.pair(self._check(i))
        return self._captions.range(a, b)

    def caption_languages(self, i: int) -> list[str]:
        """The language of each of image ``i``'s captions (``""`` unknown; all ``""`` if the source named none)."""
        a, b = self._image_captions.pair(self._check(i))
        return [self.languages[k] for k in self._caption_langs.rows(a, b).tolist()] if self.languages else [""] * (b - a)

    def sample_captions(self, indices: Sequence[int] | np.ndarray, choice: Sequence[int] | np.ndarray,
                        language_share: dict[str, float] | None = None) -> list[str]:
        """One caption per image: caption ``choice[k] % count`` of image ``indices[k]`` ("" if it has none:
        training draws only from :meth:`trainable` images); with ``language_share``, the caption that
        :func:`littune.train.sampling.pick_caption` picks among its languages."""
        out, share = [], language_share if self.languages else None
        for i, r in zip(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(choice, dtype=np.int64).tolist()):
            a, b = self._image_captions.pair(self._check(i))
            k = (pick_caption(self.caption_languages(i), r, share) if share else r % (b - a)) if b > a else None
            out.append("" if k is None else self._captions[a + k])
        return out

    def iter_captions(self, chunk: int = 65536):
        """Every caption of every image, in order (read in chunks of ``chunk`` captions)."""
        n = len(self._captions)
        for lo in range(0, n, chunk):
            yield from self._captions.range(lo, min(n, lo + chunk))

    def key(self, i: int) -> str:
        """The image's key in its source (e.g. its relative path)."""
        return self._keys[self._check(i)]

    def path(self, i: int) -> str:
        """Where the image was read from (a file, or ``shard.tar:key``)."""
        return self._paths[self._check(i)]

    def source_index(self, i: int) -> int:
        """Position of image ``i`` among the source's records (bad images leave gaps)."""
        if not hasattr(self, "_source_index"):
            self._source_index = _Npy(self.directory / "source_index.npy")
        i = self._check(i)
        return int(self._source_index.rows(i, i + 1)[0])

    def trainable(self) -> np.ndarray:
        """Indices of the images with at least one caption, in order: the rows training draws from
        (an image without a caption is cached for search and evaluation, never trained on)."""
        per_image = self._image_captions.rows(0, len(self._image_captions))
        return np.flatnonzero(np.diff(per_image) > 0)

    def skipped(self) -> list[tuple[str, str, str]]:
        """The report: ``(where, reason, detail)`` of every image (or index row) left out of the cache
        (skipped.tsv also lists, as ``no-caption``, cached images that are not trained on)."""
        return [r for r in read_skipped(self.directory / SKIPPED) if r[1] != NO_CAPTION]

    def _check(self, i: int) -> int:
        i = int(i)
        if not -self._count <= i < self._count:
            raise IndexError(f"image index {i} out of range for a cache of {self._count} images")
        return i % self._count

    def check(self, tower_fingerprint: str | None = None, source_fingerprint: str | None = None,
              allow_stale: bool | None = None) -> bool:
        """Raise :class:`~littune.errors.StaleCacheError` if the cache was built with another tower or
        source than the configuration's (the message names the expected and the found fingerprint), or,
        for an ``hf:`` or ``torch:`` tower, under the old fingerprint rule (see :mod:`.stale`).
        ``allow_stale``: None, the caller has no way to insist; False, the message names
        ``--allow-stale-cache``; True, the message goes to stderr as a warning and the cache is used.
        Returns whether the cache is stale (and used anyway)."""
        from .stale import check_cache

        return check_cache(self, tower_fingerprint, source_fingerprint, allow_stale)
