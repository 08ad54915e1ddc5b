"""Where each indexed image came from, and how to open it again: through its source's own records.

At build time the index records the source as a spec :func:`~littune.data.sources.open_source`
re-opens (type, absolute paths, options) and, per row, the image's position in
``Source.records()``. Opening row ``i`` again (a preview in ``littune serve``) re-opens the source
once and decodes ``records()[position].open()`` -- after checking that the record there still has
the row's key, and looking it up by key if not -- so whatever the source can read (a file, a member
of an uncompressed or compressed tar shard, a stem repeated across shards), the preview can.

Indexes written before the spec was recorded keep working for what they could show: a row whose
``where`` is a file is opened as that file; ``shard.tar:key`` through the records of that shard.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from ..data.records import Record
from ..errors import LittuneError

_PATH_OPTIONS = ("image_root",)


def source_spec(src) -> dict[str, Any] | None:
    """A JSON-able spec that re-opens ``src`` from any working directory (``None`` if it cannot
    be described: a custom Source type that :func:`open_source` does not know)."""
    from ..data.sources import SOURCE_TYPES

    if SOURCE_TYPES.get(src.type) is not type(src):
        return None
    shards = getattr(src, "shards", None)
    path: Any = [os.path.abspath(s) for s in shards] if isinstance(shards, list) else os.path.abspath(src.path)
    options = {k: (os.path.abspath(v) if k in _PATH_OPTIONS and isinstance(v, str) else v)
               for k, v in src.options.items()}
    return {"type": src.type, "path": path, **options}


def record_positions(records: Sequence[Record], keys: Sequence[str]) -> list[int]:
    """The position in ``records`` of the record with each key (keys are unique within a source)."""
    at = {r.key: i for i, r in reversed(list(enumerate(records)))}
    return [at[k] for k in keys]


class Originals:
    """Opens the image of an index row again, through the source it was indexed from."""

    def __init__(self, keys: Sequence[str], where: Sequence[str], spec: dict | None = None,
                 positions: Sequence[int] | None = None):
        self.keys, self.where = keys, where
        self.spec = spec if positions is not None and len(positions) == len(keys) else None
        self.positions = positions
        self._records: list[Record] | None = None
        self._by_key: dict[str, Record] | None = None
        self._shards: dict[str, dict[str, Record]] = {}
        self._lock = threading.Lock()

    def record(self, i: int) -> Record:
        """The source record of row ``i``; raises :class:`LittuneError` if the source no longer has it."""
        if self.spec is None:
            return self._legacy_record(i)
        records = self._source_records()
        pos, key = self.positions[i], self.keys[i]
        if 0 <= pos < len(records) and records[pos].key == key:
            return records[pos]
        with self._lock:
            if self._by_key is None:
                self._by_key = {r.key: r for r in records}
        if key not in self._by_key:
            raise LittuneError(f"{key} is no longer in the source {self.spec.get('path')}")
        return self._by_key[key]

    def _source_records(self) -> list[Record]:
        from ..data.sources import open_source

        with self._lock:
            if self._records is None:
                self._records = open_source(dict(self.spec)).records()
            return self._records

    def _legacy_record(self, i: int) -> Record:
        """Rows of an index without a source spec: a file, or ``shard.tar:key`` via that shard's records."""
        where, key = self.where[i], self.keys[i]
        if os.path.isfile(where):
            return Record(key=key, path=where)
        shard, sep, member = where.rpartition(":")
        if not (sep and os.path.isfile(shard)):
            raise LittuneError(f"{where} is not a file")
        with self._lock:
            if shard not in self._shards:
                from ..data.sources import open_source

                self._shards[shard] = {r.key: r for r in open_source({"type": "webdataset", "path": shard}).records()}
            found = self._shards[shard].get(member)
        if found is None:
            raise LittuneError(f"{shard} holds no image {member}")
        return found
