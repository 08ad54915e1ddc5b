"""The text side of the cache: a locked text tower's features of each distinct text, computed once.

With a locked text tower (``LL``: multilingual-e5-small read as it is, only the two linear heads
train) a caption's features never change, just as a locked image tower's never do. The main job's
pre-trained text tower costs about 7x the compute of its old text tower from scratch, so running it
at every step, at every validation and again for every evaluation would cost more than everything
else together. :class:`TextFeatureCache` stores the tower's output (before the head) of every text it
was asked for, keyed by the exact text: training, validation, evaluation and search share one
cache, and a text is computed the first time any of them needs it.

Layout of a text cache directory::

    manifest.json         format, version, the text tower's fingerprint, dim
    shards/00000.npy      (n, dim) float32 tower features
    shards/00000.json     {"texts": [...], "sha256": ...}: the shard's commit record

A shard's features are written to a temporary name and renamed, then its json (with the sha256 of
the features file) the same way: a shard is complete exactly when its json exists and the checksum
matches, so a fill that is killed at any moment keeps its complete shards and computes the rest next
time. A cache is tied to the tower that computed it (:func:`text_tower_fingerprint`: weights,
tokenizer with any prefix, pooling, context length); asked for by another tower it is refused. One
writer at a time: filling holds the directory's ``.lock``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import LittuneError, StaleCacheError
from ..fileio import write_json, write_npy
from ..hashing import hash_state_dict, hash_text
from .format import sha256
from .pread import OpenFiles, _Npy, shard_runs

FORMAT, VERSION = "littune-text-features", 1
MANIFEST, SHARDS = "manifest.json", "shards"
#: texts per shard (and per commit of a fill): ~12 MB of 384-d features
SHARD_TEXTS = 8192
#: shard files a reader keeps open at once
MAX_OPEN = 64


def text_tower_fingerprint(tower) -> str:
    """What decides a text tower's output: its weights, its tokenizer (a prefix in it included), its
    pooling and context length. Two towers with one fingerprint give the same features."""
    tok = tower.tokenizer
    if hasattr(tok, "backend_tokenizer"):  # without the padding and truncation a call leaves set in it
        state = json.loads(tok.backend_tokenizer.to_str())
        backend = json.dumps({k: v for k, v in state.items() if k not in ("padding", "truncation")}, sort_keys=True)
    else:
        backend = repr(tok)
    pooling = getattr(tower, "pooling", None) or getattr(getattr(tower, "config", None), "pooling", None)
    extra = f"{pooling}|{tower.context_length}|{getattr(tower, 'prefix', '') or ''}"
    return (f"{getattr(tower, 'kind', type(tower).__name__)}|w={hash_state_dict(tower.state_dict())[:16]}"
            f"|t={hash_text(backend)[:12]}|x={hash_text(extra)[:8]}")


def text_keys(texts) -> np.ndarray:
    """``(n,)`` uint64: the first 8 bytes of each text's blake2b (what the cache's index holds: 16 bytes a text
    with its row, never the text; two of 2M texts share one with a chance of about 1e-7)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                        for t in texts), dtype=np.uint64, count=len(texts))


class TextFeatureCache:
    """Tower features by text. :meth:`open` one, :meth:`fill` it, read it with :meth:`features`.

    Nothing but 16 bytes a text is held in memory (the index: a sorted 8-byte key and a row number): the
    features stay in the shard files, read with ``pread`` (at most :data:`MAX_OPEN` open), and :meth:`fill`
    reads its texts as they come, a shard's worth at a time. So training from a large cache under ``LL``
    keeps the process's memory flat in the number of captions, as the image cache's reader does."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.fingerprint, self.dim = manifest["tower"], int(manifest["dim"])
        self._keys = np.empty(0, np.uint64)  # sorted, distinct (the first row of a text wins)
        self._where = np.empty(0, np.int64)  # the row of each key: every shard's rows one after another
        self._files: list[_Npy] = []  # each shard's features, headers parsed; reopened when used
        self._starts: list[int] = []
        self._count = 0
        self._shards: set[str] = set()
        self._open = OpenFiles(MAX_OPEN)
        self._lock = threading.Lock()  # the prefetch thread and the main thread may read at once

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str, dim: int) -> "TextFeatureCache":
        """The cache in ``directory`` for the tower ``fingerprint`` (created if absent). A cache of
        another tower is refused (:class:`StaleCacheError`), never mixed."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise LittuneError(f"text cache {directory} is a file, not a folder")
        path = directory / MANIFEST
        if path.is_file():
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise LittuneError(f"{path} is not a text cache manifest (unreadable JSON): delete the folder") from None
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise LittuneError(f"{directory} is not a littune text cache of version {VERSION}: delete it or "
                                   "choose another folder")
            if manifest.get("tower") != fingerprint or int(manifest.get("dim", -1)) != dim:
                raise StaleCacheError(f"text cache {directory} holds the features of text tower {manifest.get('tower')}, "
                                      f"not of {fingerprint}: choose another data.text_cache folder, or delete it")
        else:
            manifest = {"format": FORMAT, "version": VERSION, "tower": fingerprint, "dim": int(dim)}
            write_json(path, manifest)
        cache = cls(directory, manifest)
        cache._read_shards()
        return cache

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, text: str) -> bool:
        return bool(self._rows_of(text_keys([text]))[0] >= 0)

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, -1 where the cache lacks it."""
        at = np.minimum(np.searchsorted(self._keys, keys), max(len(self._keys) - 1, 0))
        found = self._keys[at] == keys if len(self._keys) else np.zeros(len(keys), bool)
        return np.where(found, self._where[at] if len(self._keys) else -1, -1)

    def _read_shards(self) -> None:
        """Take in every complete shard not read yet (another writer may have added some)."""
        folder = self.directory / SHARDS
        for rec_path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            if rec_path.stem in self._shards:
                continue
            npy = rec_path.with_suffix(".npy")
            try:
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
                ok = npy.is_file() and rec.get("sha256") == sha256(npy)
            except ValueError:
                ok = False
            if not ok:  # a half-committed shard: its texts are computed again
                continue
            self._add(rec_path.stem, rec["texts"], npy)

    def _add(self, name: str, texts: list[str], npy: Path) -> None:
        f = _Npy(npy)
        f.close()  # opened again when read (:meth:`_file`)
        if f.shape != (len(texts), self.dim) or f.dtype != np.float32:
            raise LittuneError(f"{npy} holds {f.dtype}{list(f.shape)} features for {len(texts)} texts of dim {self.dim}")
        keys = text_keys(texts)
        keys, first = np.unique(keys, return_index=True)  # sorted; a text twice in a shard: its first row
        new = self._rows_of(keys) < 0  # a text another shard holds already keeps that row
        keys, rows = keys[new], first[new].astype(np.int64) + self._count
        at = np.searchsorted(self._keys, keys)
        self._keys, self._where = np.insert(self._keys, at, keys), np.insert(self._where, at, rows)
        self._files.append(f)
        self._starts.append(self._count)
        self._count += len(texts)
        self._shards.add(name)

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts not in the cache, in first-seen order."""
        texts = list(dict.fromkeys(texts))
        return [t for t, r in zip(texts, self._rows_of(text_keys(texts))) if r < 0]

    def features(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 features; every text must be in the cache (read with ``pread``, one
        read per run of consecutive rows)."""
        rows = self._rows_of(text_keys(texts))
        if (rows < 0).any():
            raise LittuneError(f"text cache {self.directory} has no features for {texts[int(np.argmax(rows < 0))]!r}: "
                               "fill it first")
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        order, runs = shard_runs(rows, np.asarray(self._starts, np.int64))
        sorted_out = np.empty_like(out)
        with self._lock:
            for a, b, j, lo in runs:
                self._file(j).rows(lo, lo + b - a, out=sorted_out[a:b])
        out[order] = sorted_out
        return out

    def _file(self, j: int) -> _Npy:
        return self._open.get(j, self._files[j].reopen)

    def fill(self, texts: Iterable[str], encode: Callable[[list[str]], np.ndarray], progress: bool = False,
             shard_texts: int = SHARD_TEXTS) -> int:
        """Compute and store the features of the texts the cache lacks (``encode``: texts -> (n, dim)
        tower features), one committed shard at a time; returns how many were computed."""
        from .lock import lock, unlock

        handle, done, bar = None, 0, None
        try:
            for chunk in self._todo(texts, shard_texts):
                if handle is None:
                    handle = lock(self.directory)
                    self._read_shards()  # what a writer before us added
                    bar = _bar(None) if progress else None
                    chunk = self.missing(chunk)
                    if not chunk:
                        continue
                chunk.sort(key=len)  # similar lengths together: batches pad little
                feats = np.asarray(encode(chunk), dtype=np.float32)
                if feats.shape != (len(chunk), self.dim):
                    raise LittuneError(f"text features of shape {feats.shape} for {len(chunk)} texts of dim {self.dim}")
                self._commit(chunk, feats)
                done += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
            if handle is not None:
                unlock(handle)
        return done

    def _todo(self, texts: Iterable[str], shard_texts: int):
        """The distinct texts the cache lacks, ``shard_texts`` at a time, read from ``texts`` as they come (a
        text of an earlier chunk is in the cache once that chunk is committed: nothing is held per text)."""
        chunk: dict[str, None] = {}
        for t in texts:
            if t in chunk:
                continue
            chunk[t] = None
            if len(chunk) >= shard_texts:
                todo = self.missing(chunk)
                if len(todo) >= shard_texts // 2:
                    yield todo
                    chunk = {}
                else:  # mostly known texts: keep gathering
                    chunk = dict.fromkeys(todo)
        todo = self.missing(chunk)
        if todo:
            yield todo

    def _commit(self, texts: list[str], feats: np.ndarray) -> None:
        folder = self.directory / SHARDS
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()]
        name = f"{max(taken, default=-1) + 1:05d}"
        write_npy(folder / f"{name}.npy", feats)
        write_json(folder / f"{name}.json", {"texts": texts, "sha256": sha256(folder / f"{name}.npy")})
        self._add(name, texts, folder / f"{name}.npy")


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="text features", unit="text", mininterval=1.0)
