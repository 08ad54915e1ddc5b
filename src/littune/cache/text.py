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

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import LittuneError, StaleCacheError
from ..fileio import write_json, write_npy
from ..hashing import hash_state_dict, hash_text
from .format import sha256

FORMAT, VERSION = "littune-text-features", 1
MANIFEST, SHARDS = "manifest.json", "shards"
#: texts per shard (and per commit of a fill): ~12 MB of 384-d features
SHARD_TEXTS = 8192


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


class TextFeatureCache:
    """Tower features by text. :meth:`open` one, :meth:`fill` it, read it with :meth:`features`."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = Path(directory), manifest
        self.fingerprint, self.dim = manifest["tower"], int(manifest["dim"])
        self._index: dict[str, int] = {}
        # every shard's rows one after another; the capacity doubles when full, so adding n rows costs O(n)
        self._rows = np.empty((0, self.dim), np.float32)
        self._count = 0
        self._shards: set[str] = set()

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
        return len(self._index)

    def __contains__(self, text: str) -> bool:
        return text in self._index

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
            feats = np.load(npy, allow_pickle=False)
            if feats.shape != (len(rec["texts"]), self.dim):
                raise LittuneError(f"{npy} holds {feats.shape} features for {len(rec['texts'])} texts of dim {self.dim}")
            self._add(rec_path.stem, rec["texts"], feats)

    def _add(self, name: str, texts: list[str], feats: np.ndarray) -> None:
        base, end = self._count, self._count + len(feats)
        if end > len(self._rows):
            grown = np.empty((max(end, 2 * len(self._rows)), self.dim), np.float32)
            grown[:base] = self._rows[:base]
            self._rows = grown
        self._rows[base:end] = feats
        for k, t in enumerate(texts):
            self._index.setdefault(t, base + k)
        self._count = end
        self._shards.add(name)

    def missing(self, texts: Iterable[str]) -> list[str]:
        """The distinct texts not in the cache, in first-seen order."""
        return [t for t in dict.fromkeys(texts) if t not in self._index]

    def features(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 features; every text must be in the cache."""
        try:
            rows = np.fromiter((self._index[t] for t in texts), dtype=np.int64, count=len(texts))
        except KeyError as e:
            raise LittuneError(f"text cache {self.directory} has no features for {e.args[0]!r}: fill it first") from None
        return self._rows[rows]

    def fill(self, texts: Iterable[str], encode: Callable[[list[str]], np.ndarray], progress: bool = False,
             shard_texts: int = SHARD_TEXTS) -> int:
        """Compute and store the features of the texts the cache lacks (``encode``: texts -> (n, dim)
        tower features), one committed shard at a time; returns how many were computed."""
        todo = self.missing(texts)
        if not todo:
            return 0
        from .lock import lock, unlock

        handle = lock(self.directory)
        try:
            self._read_shards()  # what a writer before us added
            todo = self.missing(todo)
            todo.sort(key=len)  # similar lengths together: batches pad little
            bar = _bar(len(todo)) if progress else None
            for lo in range(0, len(todo), shard_texts):
                chunk = todo[lo:lo + shard_texts]
                feats = np.asarray(encode(chunk), dtype=np.float32)
                if feats.shape != (len(chunk), self.dim):
                    raise LittuneError(f"text features of shape {feats.shape} for {len(chunk)} texts of dim {self.dim}")
                self._commit(chunk, feats)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        finally:
            unlock(handle)
        return len(todo)

    def _commit(self, texts: list[str], feats: np.ndarray) -> None:
        folder = self.directory / SHARDS
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()]
        name = f"{max(taken, default=-1) + 1:05d}"
        write_npy(folder / f"{name}.npy", feats)
        write_json(folder / f"{name}.json", {"texts": texts, "sha256": sha256(folder / f"{name}.npy")})
        self._add(name, texts, feats)


def _bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="text features", unit="text", mininterval=1.0)
