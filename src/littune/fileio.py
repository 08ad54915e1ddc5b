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
import re
import shutil
from pathlib import Path
from typing import Callable, Collection, Iterable, Sequence

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


def replace_dir(tmp: Path, out: Path) -> None:
    """``tmp`` (a complete folder beside ``out``) becomes ``out``. An ``out`` there already is moved
    aside first (to ``.NAME.old-PID``) and removed after, so ``out`` is never a mix of the two; a crash
    between the two renames leaves the old folder whole beside it, and :func:`clear_leftovers` puts
    it back. A failed rename puts the old folder back at once."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)  # the earlier one comes back
        raise
    shutil.rmtree(old, ignore_errors=True)


#: what a killed writer leaves: ``.NAME.old-PID`` (:func:`replace_dir`), ``NAME.tmp-PID`` and
#: ``.NAME.tmp-PID`` (:func:`atomic_write`, folders written beside their final name), ``.tmp-NAME-PID``
_LEFTOVER = re.compile(r"(?:\.?(?P<name>.+)\.(?P<kind>old|tmp)|\.tmp-.+)-(?P<pid>\d+)")


def _running(pid: int) -> bool:
    if pid == os.getpid():  # our own name from an earlier process of the same number
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def clear_leftovers(folder: Path, everything: bool = False, names: Collection[str] | None = None) -> list[str]:
    """Remove from ``folder`` what killed writers left (see ``_LEFTOVER``): those of processes that no
    longer run, or all of them with ``everything`` (the caller holds the folder's lock, so no one else
    writes there). A ``.NAME.old-PID`` whose ``NAME`` is missing is put back instead: a
    :func:`replace_dir` was killed between its renames. ``names``: only the leftovers of these names.
    Returns a line per thing done."""
    done = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m or (names is not None and m["name"] not in names) or (not everything and _running(int(m["pid"]))):
            continue
        if m["kind"] == "old" and not (folder / m["name"]).exists():
            os.replace(p, folder / m["name"])
            done.append(f"put back {folder / m['name']} (a replacement of it was interrupted)")
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p} (left by an interrupted write)")
    return done


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
