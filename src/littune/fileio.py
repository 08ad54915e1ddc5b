"""Files that are never half-written, and the one ``skipped.tsv`` report of the whole project.

Every file littune publishes (cache shards and tables, manifests, dataset CSVs, index files, exported
towers) is written to a temporary name in the same folder, flushed to disk and renamed over its final
name: a reader, or a run killed at any moment, sees the old file or the new one, never a mix.

``skipped.tsv`` is one schema wherever something is left out (an image that does not decode, a
caption-less row, an SVG a dataset builder drops): a header ``where<TAB>reason<TAB>detail`` and one
row per item. ``where`` says which item (a path, ``shard.tar:key``, a code point), ``reason`` is a
short word from a fixed vocabulary (``corrupt``, ``missing``, ``no-caption``...), ``detail`` is free
text. Tabs and newlines inside a field become spaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

SKIPPED_HEADER = ("where", "reason", "detail")


def cache_home(override: str | Path | None = None) -> Path:
    """littune's own cache folder (downloads, exported towers): ``override``, else
    ``$LITTUNE_CACHE``, else ``~/.cache/littune``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("LITTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "littune"


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str | Callable, durable: bool = True) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes to a binary file) to ``path``
    through a temporary file in the same folder: fsync, rename, fsync the folder. Returns ``path``.

    ``durable=False`` skips both fsyncs (still never half-written for a reader): for many small files
    that can be made again, e.g. rendered images, where an fsync each would cost more than the work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj) -> Path:
    """``obj`` as indented UTF-8 JSON, atomically."""
    return atomic_write(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_npy(path: str | Path, arr: np.ndarray) -> Path:
    """A C-order ``.npy`` (no pickles), atomically."""
    return atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def _field(x) -> str:
    return " ".join(str(x).split()) if x is not None else ""


def write_skipped(path: str | Path, rows: Iterable[Sequence]) -> int:
    """``skipped.tsv``: the header, then one ``where, reason[, detail]`` row per item. Returns the count."""
    lines = ["\t".join(SKIPPED_HEADER)]
    for r in rows:
        r = list(r) + [""] * (3 - len(r))
        lines.append("\t".join(_field(x) for x in r[:3]))
    atomic_write(path, "\n".join(lines) + "\n")
    return len(lines) - 1


def read_skipped(path: str | Path) -> list[tuple[str, str, str]]:
    """The rows of a ``skipped.tsv`` as ``(where, reason, detail)`` (an absent file: none)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = p.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple((r.split("\t") + ["", "", ""])[:3]) for r in rows if r]
