"""Files read with positional reads (``pread``), never memory-mapped: a ``.npy`` array by rows, a table of strings.

What :class:`~littune.cache.EmbeddingCache` reads its shards, token files and tables with (see :class:`_File`).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable

import numpy as np

from ..errors import LittuneError


class _File:
    """A file read with positional reads (``pread``), never memory-mapped.

    Reading rows through ``pread`` instead of a memory map keeps the process's memory flat: pages of
    a mapped file that has been touched count in its resident set (and the kernel maps 64 KB around
    every page fault), so random rows from a large cache would grow RSS up to the cache's size over
    an epoch. With ``pread`` only the page cache holds them, which belongs to no process.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self.fd).st_size

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous array ``buf`` with the bytes at ``offset``."""
        view = memoryview(buf).cast("B")
        n = _read_at(self.fd, view, offset)
        while 0 < n < len(view):  # short reads are legal; a 0 means the file ended early
            view, offset = view[n:], offset + n
            n = _read_at(self.fd, view, offset)
        if n <= 0 and len(view):
            raise LittuneError(f"{self.path} is shorter than its manifest says: re-run `littune embed`")

    def read(self, offset: int, nbytes: int) -> bytes:
        data = _pread(self.fd, nbytes, offset) if nbytes else b""
        if len(data) < nbytes:  # a short read (legal, rare): finish it
            buf = np.empty(nbytes, dtype=np.uint8)
            self.read_into(buf, offset)
            data = buf.tobytes()
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __getstate__(self) -> dict:  # pickled (e.g. to a spawned process): the copy opens its own file
        return {**self.__dict__, "fd": -1, "_was_open": self.fd >= 0}

    def __setstate__(self, state: dict) -> None:
        was_open = state.pop("_was_open", False)
        self.__dict__.update(state)
        if was_open:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


if hasattr(os, "preadv"):
    _pread = os.pread

    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)
else:  # pragma: no cover - Windows: seek + read under a lock
    import threading

    _SEEK_LOCK = threading.Lock()

    def _pread(fd: int, nbytes: int, offset: int) -> bytes:
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, nbytes)

    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        data = _pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)


_PAIRS = {"<i8": struct.Struct("<qq"), ">i8": struct.Struct(">qq")}


class _Npy(_File):
    """A C-order ``.npy`` array read by rows (first axis) with ``pread``."""

    def __init__(self, path: Path):
        super().__init__(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            offset = f.tell()
        if fortran and len(shape) > 1:
            raise LittuneError(f"{path} is stored in Fortran order; littune writes C order")
        self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.shape and self.size < self.offset + self.shape[0] * self.row_bytes:
            raise LittuneError(f"{path} is shorter than its header says")
        self._pair = self.dtype.str if self.dtype.str in _PAIRS else None  # an int64 offsets table

    def reopen(self) -> "_Npy":
        """The same file, opened again (header already parsed and checked): one ``open()``."""
        f = object.__new__(type(self))
        f.__dict__.update(self.__dict__)
        f.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return f

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` (``0 <= lo <= hi <= len``), read into ``out`` when given."""
        if out is None:
            out = np.empty((hi - lo,) + self.shape[1:], dtype=self.dtype)
        if hi > lo:
            self.read_into(out, self.offset + lo * self.row_bytes)
        return out

    def pair(self, i: int) -> tuple[int, int]:
        """Elements ``i`` and ``i + 1`` of a 1-D int64 array (an offsets table), as ints."""
        if self._pair is not None:  # one pread + struct (no numpy array for two numbers)
            return _PAIRS[self._pair].unpack(self.read(self.offset + i * 8, 16))
        a, b = self.rows(i, i + 2)
        return int(a), int(b)


class _Strings:
    """A UTF-8 blob + int64 offsets, read with ``pread``."""

    def __init__(self, blob: Path, offsets: Path):
        self.offsets = _Npy(offsets)
        self.blob = _File(blob)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = self.offsets.pair(i)
        return self.blob.read(a, b - a).decode("utf-8")

    def range(self, lo: int, hi: int) -> list[str]:
        """Strings ``lo:hi`` with two reads."""
        off = self.offsets.rows(lo, hi + 1)
        base = int(off[0])
        data = self.blob.read(base, int(off[-1]) - base)
        cut = (off - base).tolist()
        return [data[cut[k]:cut[k + 1]].decode("utf-8") for k in range(hi - lo)]


class OpenFiles:
    """At most ``limit`` files open at once, keyed; the least recently used is closed first.

    ``get(key, open_file)`` returns the open file of ``key``, calling ``open_file()`` when it is not open (a
    random batch touches most shards of a cache, so keeping them open saves an ``open()`` each; the limit keeps
    a process within its open-file limit however many shards there are)."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self._files: OrderedDict = OrderedDict()

    def get(self, key: Hashable, open_file: Callable[[], _File]):
        f = self._files.get(key)
        if f is not None:
            self._files.move_to_end(key)
            return f
        f = self._files[key] = open_file()
        while len(self._files) > self.limit:
            self._files.popitem(last=False)[1].close()
        return f

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._files

    def __getitem__(self, key: Hashable):
        return self._files[key]

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


def image_rows(indices, count: int) -> np.ndarray:
    """``indices`` as int64 row numbers of a cache of ``count`` images (negative ones from the end); one out of
    range is an :class:`IndexError` naming it."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -count or idx.max() >= count):
        bad = idx[(idx < -count) | (idx >= count)][0]
        raise IndexError(f"image index {bad} out of range for a cache of {count} images")
    return np.where(idx < 0, idx + count, idx)


def shard_runs(rows: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """How to read ``rows`` (int64 row numbers) from shards whose first rows are ``starts``, one read per run of
    consecutive rows within a shard: ``(order, runs)``. ``order`` sorts the rows; a run ``(a, b, shard, local)``
    is the sorted positions ``a:b``, the rows ``local:local + b - a`` of shard ``shard``."""
    order = np.argsort(rows, kind="stable")
    srows = rows[order]
    which = np.searchsorted(starts, srows, side="right") - 1
    cuts = np.flatnonzero((np.diff(srows) != 1) | (np.diff(which) != 0)) + 1
    bounds = np.concatenate([[0], cuts, [len(srows)]]).tolist()
    which_l, local_l = which.tolist(), (srows - starts[which]).tolist()
    return order, [(a, b, which_l[a], local_l[a]) for a, b in zip(bounds[:-1], bounds[1:])]
