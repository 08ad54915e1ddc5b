"""littune's feature index: which cached row holds which image file's features, so that no file is embedded twice.

Every shard that :func:`~littune.cache.embed_source` writes is entered in one SQLite file in littune's
cache folder (``$LITTUNE_CACHE/features/index-1.sqlite3``, else ``~/.cache/littune/features/``): the
shard file, its sha256, and for each row the identity of the image file it was computed from
(:func:`file_identity`: resolved path, size, mtime and inode) under the key of the computation
(:func:`computation_key`: tower fingerprint, pre-processing, runtime and device, pixel limit, decoding).
The index holds no features: they stay in the caches, each of which remains complete on its own (a
reusing run copies the rows into its own shards). A row is used again only from a shard file whose
sha256 is the one entered (:class:`Rows`); a shard deleted, moved or rewritten since is dropped from the
index when a look-up meets it. The index is a convenience: if it cannot be opened or read, littune
says so in one line and embeds without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LittuneError
from ..fileio import cache_home
from .pread import OpenFiles, _Npy
from .tokens import token_path

INDEX_DIR = "features"
INDEX_FILE = "index-1.sqlite3"  # the number is the schema's: another schema is another file
#: a file modified less than this many seconds before it is looked at could change again within the file
#: system's timestamp granularity (up to 2 s) and keep its mtime: it is neither entered nor reused
RACY_SECONDS = 2.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, path BLOB UNIQUE NOT NULL, sha256 TEXT NOT NULL,
    dtype TEXT NOT NULL, views INTEGER NOT NULL, dim INTEGER NOT NULL, seed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (comp TEXT NOT NULL, ident BLOB NOT NULL, key BLOB NOT NULL,
    shard INTEGER NOT NULL, row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS rows_by_ident ON rows (comp, ident);
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows (shard);
"""
_LOOKUP = """SELECT s.path, s.sha256, r.row FROM rows r JOIN shards s ON s.id = r.shard
WHERE r.comp = ? AND r.ident = ? AND s.dim = ? AND (s.dtype = ? OR s.dtype = 'float32')
AND (? = 0 OR (s.views >= ? AND s.seed = ? AND r.key = ?)) ORDER BY s.id DESC"""


def _blob(text: str) -> bytes:
    """A key or path as bytes (a name that is not UTF-8 is kept, escaped, as Python reads it)."""
    return text.encode("utf-8", "surrogateescape")


def index_path() -> Path:
    return cache_home() / INDEX_DIR / INDEX_FILE


def file_identity(item, now: float | None = None) -> bytes | None:
    """A 16-byte digest of the file an image is read from: its resolved path, size, mtime (ns) and inode,
    and for a tar member its offset and size. None when there is no file (bytes in memory, a Pillow
    image), it cannot be read, or it was modified within :data:`RACY_SECONDS` (or in the future)."""
    member = ""
    if isinstance(item, (str, Path)):
        path = item
    elif getattr(item, "data", None) is not None:
        return None
    elif getattr(item, "shard", None) is not None:
        path, member = item.shard, f"{item.offset}\0{item.size}"
    else:
        path = getattr(item, "path", None)
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or (time.time() if now is None else now) - st.st_mtime < RACY_SECONDS:
        return None
    text = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{member}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:16]


def computation_key(*, tower_fingerprint: str, scheme: int, preprocess: dict, dim: int, max_pixels: int | None,
                    decode: str, runtime: str, tokens: dict | None = None) -> str:
    """What makes a row's features what they are, besides the image file: the tower (fingerprint, the rule it
    was made by, its pre-processing and output size), the pixel limit, how the eval view was decoded
    (``draft`` or ``full``) and what computed it (``runtime/device``: torch and onnxruntime, a GPU and a CPU
    differ in the last bits). ``tokens``: a token cache's grid (:mod:`.tokens`): its rows come with their tokens,
    computed by the graph with the map output, so a token cache reuses only the rows of token caches of the
    same grid (and a cache without tokens only the rows of caches without)."""
    key = {"tower": tower_fingerprint, "scheme": scheme, "preprocess": preprocess, "dim": int(dim),
           "max_pixels": max_pixels, "decode": decode, "runtime": runtime}
    if tokens:  # absent otherwise: the keys of caches without tokens are what they were
        key["tokens"] = tokens
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def eval_decode(preprocess, views: int) -> str:
    """How the eval view of a row is decoded: drafted (fast decoding, no augmented views) or in full."""
    return "draft" if preprocess.draft_to is not None and views == 0 else "full"


@dataclass(frozen=True)
class Found:
    """A row of a registered shard file: where it is and the sha256 the file must have."""

    path: str
    sha256: str
    row: int

    @property
    def cache(self) -> str:
        return str(Path(self.path).parent.parent)


_WARNED: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"littune: warning: {text}", file=sys.stderr)


class FeatureIndex:
    """The SQLite feature index (:func:`index_path` unless told). A connection is opened per operation and
    closed after it (none is open when decoding workers fork); every write is one transaction."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else index_path()
        self.broken = False

    def _connect(self):
        """A connection with the schema in place, or None (the index marked broken, once said why)."""
        if self.broken:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=60)
        except (sqlite3.Error, OSError) as e:
            self._failed(e)
            return None
        try:
            con.executescript(_SCHEMA)
        except sqlite3.Error as e:
            con.close()
            self._failed(e)
            return None
        return con

    def _failed(self, e: Exception) -> None:
        self.broken = True
        _warn_once(f"the feature index {self.path} cannot be used ({type(e).__name__}: {e}); images are embedded "
                   "without reusing earlier caches (remove the file to start a new index)")

    def lookup(self, comp: str, wants, dim: int, dtype: str, views: int, seed: int):
        """For each ``(identity, key)`` of the iterable ``wants``, in order, the registered rows that can stand
        in for it, newest first: the same computation and ``dim``; stored as ``dtype`` or float32 (a float16
        cache of a float32 row is the same bytes); with ``views`` augmented views, at least as many from the
        same ``seed`` and image key (a view's random crop depends on both). One connection for all of them;
        if the index fails, the rest find nothing."""
        con = self._connect()
        try:
            for ident, key in wants:
                found: list[Found] = []
                if con is not None:
                    try:
                        found = [Found(os.fsdecode(p), h, r) for p, h, r in con.execute(
                            _LOOKUP, (comp, ident, dim, dtype, views, views, seed, _blob(key)))]
                    except sqlite3.Error as e:
                        con.close()
                        con = None
                        self._failed(e)
                yield found
        finally:
            if con is not None:
                con.close()

    def _write(self, work) -> None:
        """``work(connection)`` as one transaction (nothing if the index is broken or fails)."""
        con = self._connect()
        if con is None:
            return
        try:
            with con:
                work(con)
        except sqlite3.Error as e:
            self._failed(e)
        finally:
            con.close()

    def enter(self, comp: str, npy: Path, sha256: str, dtype: str, views: int, dim: int, seed: int,
              rows: list[tuple[bytes, str, int]]) -> None:
        """Enter the shard file ``npy`` (replacing what was entered under its path) and its ``rows``:
        ``(identity, image key, row)``."""
        path = os.fsencode(os.path.realpath(npy))

        def work(con) -> None:
            self._drop(con, [path])
            sid = con.execute("INSERT INTO shards (path, sha256, dtype, views, dim, seed) VALUES (?, ?, ?, ?, ?, ?)",
                              (path, sha256, dtype, int(views), int(dim), int(seed))).lastrowid
            con.executemany("INSERT INTO rows (comp, ident, key, shard, row) VALUES (?, ?, ?, ?, ?)",
                            [(comp, ident, _blob(key), sid, int(row)) for ident, key, row in rows])

        self._write(work)

    def forget(self, stale: list[tuple[str, str]]) -> None:
        """Drop the shard files ``(path, sha256)`` that are gone or changed, and their rows (a file entered
        again since, with another sha256, stays)."""
        if stale:
            self._write(lambda con: self._drop(con, [os.fsencode(p) for p, _ in stale], [h for _, h in stale]))

    def moved(self, old: str | Path, new: str | Path | None) -> None:
        """The shard files under the folder ``old`` are now under ``new`` (renamed; ``new``: None, deleted)."""
        prefix = os.fsencode(os.path.join(os.path.realpath(old), ""))

        def work(con) -> None:
            under = con.execute("SELECT id, path FROM shards WHERE substr(path, 1, ?) = ?",
                                (len(prefix), prefix)).fetchall()
            if new is None:
                self._drop(con, [p for _, p in under])
                return
            target = os.fsencode(os.path.join(os.path.realpath(new), ""))
            for sid, p in under:
                self._drop(con, [target + p[len(prefix):]])
                con.execute("UPDATE shards SET path = ? WHERE id = ?", (target + p[len(prefix):], sid))

        self._write(work)

    @staticmethod
    def _drop(con, paths: list[bytes], sha256s: list[str | None] | None = None) -> None:
        for p, h in zip(paths, sha256s or [None] * len(paths)):
            for (sid,) in con.execute("SELECT id FROM shards WHERE path = ? AND (? IS NULL OR sha256 = ?)",
                                      (p, h, h)).fetchall():
                con.execute("DELETE FROM rows WHERE shard = ?", (sid,))
                con.execute("DELETE FROM shards WHERE id = ?", (sid,))


class Rows:
    """Rows of registered shard files, read only from a file whose sha256 is the one entered.

    :meth:`check` reads a file once (through one descriptor) and remembers its inode, size and mtime;
    :meth:`read` reopens it only if they are unchanged (littune replaces a shard by renaming a new file
    over it, never writes one in place), else says that the cache changed during the run. With ``tokens``
    (the token spec of a token cache) a shard of a token cache is entered with ``FEATURES_SHA+TOKENS_SHA``:
    its token file (:func:`.tokens.token_path`) is checked alike and :meth:`token_rows` reads it."""

    def __init__(self, dim: int, max_open: int = 64, tokens: dict | None = None):
        self.dim, self.tokens = dim, tokens
        self._checked: dict[tuple[str, str], tuple | None] = {}  # -> (features' signature, tokens' or None)
        self._open = OpenFiles(max_open)

    def check(self, found: Found) -> bool:
        """Is ``found``'s shard file the one that was entered (and a ``(n, 1 + views, dim)`` array)? With
        ``tokens``: and its token file too (``(n, h*w, F)``)?"""
        k = (found.path, found.sha256)
        if k not in self._checked:
            feats, _, toks = found.sha256.partition("+")
            sig = _signature(found.path, feats, self.dim)
            tok = None
            if sig is not None and self.tokens is not None:
                h, w = self.tokens["grid"]
                tok = _signature(str(token_path(Path(found.path))), toks, self.tokens["dim"], (sig[-1], h * w))
            self._checked[k] = None if sig is None or (self.tokens is not None and tok is None) else (sig, tok)
        sig = self._checked[k]
        return sig is not None and found.row < sig[0][-1]

    def read(self, found: list[Found], views: int) -> np.ndarray:
        """The rows ``found`` (each checked before), slots ``0..views``, as float32 ``(n, 1 + views, dim)``."""
        out = np.empty((len(found), 1 + views, self.dim), dtype=np.float32)
        for k, f in enumerate(found):
            out[k] = self._file(f).rows(f.row, f.row + 1)[0, :1 + views]
        return out

    def token_rows(self, found: list[Found]) -> np.ndarray:
        """The tokens of the rows ``found`` (each checked before, with ``tokens``), float32 ``(n, h*w, F)``."""
        h, w = self.tokens["grid"]
        out = np.empty((len(found), h * w, self.tokens["dim"]), dtype=np.float32)
        for k, f in enumerate(found):
            out[k] = self._file(f, tokens=True).rows(f.row, f.row + 1)[0]
        return out

    def _file(self, found: Found, tokens: bool = False) -> _Npy:
        path = str(token_path(Path(found.path))) if tokens else found.path
        return self._open.get(path, lambda: self._open_checked(found, path, tokens))

    def _open_checked(self, found: Found, path: str, tokens: bool) -> _Npy:
        """``path`` opened, if it is still the file :meth:`check` entered (device, inode, size, mtime)."""
        f = _Npy(Path(path))
        st = os.fstat(f.fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._checked[(found.path, found.sha256)][
                int(tokens)][:4]:
            f.close()
            raise LittuneError(f"the cache {found.cache} that features were reused from changed during this "
                               "run; run the same command again (the shards written so far are kept)")
        return f

    def close(self) -> None:
        self._open.close()


def _signature(path: str, sha256: str, dim: int, lead: tuple[int, int] | None = None) -> tuple | None:
    """``(dev, inode, size, mtime_ns, rows)`` of the shard file ``path`` if its bytes hash to ``sha256``
    and it holds ``(rows, 1 + views, dim)`` features (``lead``: ``(rows, tokens)``, a token file), else None."""
    try:
        f = _Npy(Path(path))
    except (OSError, ValueError, LittuneError):
        return None
    try:
        st = os.fstat(f.fd)
        h = hashlib.sha256()
        for pos in range(0, f.size, 1 << 20):
            h.update(f.read(pos, min(1 << 20, f.size - pos)))
        if h.hexdigest() != sha256 or len(f.shape) != 3 or f.shape[2] != dim or (lead and f.shape[:2] != lead):
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, f.shape[0]
    except (OSError, LittuneError):
        return None
    finally:
        f.close()
