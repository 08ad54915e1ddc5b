"""One writer per cache directory, and a directory made ready for a plan.

A writer holds an exclusive ``flock`` on ``CACHE/.lock`` for the whole run; the OS drops it when
the process ends, even on ``kill -9``. Decoding workers close their inherited copy of the lock's
file descriptor, so a lingering worker never keeps a killed run's lock. (``littune train`` locks its
run directory with the same lock: :mod:`littune.train.rundir`.)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import LittuneError
from ..fileio import write_json
from .format import LOCK, MANIFEST, OUR_FILES, PLAN, SHARD_DIR, plan_differences, plan_hash
from .registry import FeatureIndex
from .stale import OLD_RULE, old_fingerprint_rule

#: where the shards of a cache being replaced wait, readable, until the new one is complete
PREVIOUS = "shards-previous"
#: file descriptors of the cache locks this process holds (closed in forked decoding workers)
_LOCK_FDS: set[int] = set()


def lock(out: Path, what: str = "cache", by: str = "`littune embed`"):
    """An exclusive lock on the directory ``out`` for this run (released by the OS even on kill -9).
    The lock file names the holder (pid, host, start time); a second writer's one-line error repeats it.
    ``what``/``by``: the directory's kind and the command that holds it, for that message."""
    if out.exists() and not out.is_dir():
        raise LittuneError(f"{what} directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no protection against a second writer
        pass
    except OSError:
        f.seek(0)
        holder = " ".join(f.read(300).split())
        f.close()
        raise LittuneError(f"{what} {out} is being written by another {by}{f' ({holder})' if holder else ''}; "
                           "wait for it to finish") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _LOCK_FDS.add(f.fileno())
    return f


def unlock(f) -> None:
    _LOCK_FDS.discard(f.fileno())
    f.close()


def close_inherited_locks() -> None:
    """In a forked worker: close the copies of the parent's lock descriptors."""
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


def clear(out: Path, keep_previous: bool = False) -> None:
    """Remove a previous cache's files (only littune's own) from ``out``. ``keep_previous``: its shards are
    set aside in ``shards-previous/`` instead, for the run that replaces it to copy the rows it can reuse
    (:mod:`.reuse`); :func:`drop_previous` removes them once the new cache is complete."""
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
    sd = out / SHARD_DIR
    if keep_previous and not (out / PREVIOUS).exists() and sd.is_dir() and any(sd.glob("*.npy")):
        old = os.path.realpath(sd)
        os.rename(sd, out / PREVIOUS)
        FeatureIndex().moved(old, os.path.realpath(out / PREVIOUS))
    elif not keep_previous:
        drop_previous(out)
    if sd.is_dir():
        _remove_shard_files(sd)


def _remove_shard_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.suffix in (".npy", ".json", ".reuse") or ".tmp-" in p.name:
            p.unlink(missing_ok=True)


def drop_previous(out: Path) -> None:
    """Remove the shards a replaced cache left in ``shards-previous/`` (and their feature index entries)."""
    prev = out / PREVIOUS
    if prev.is_dir():
        FeatureIndex().moved(os.path.realpath(prev), None)
        _remove_shard_files(prev)
        try:
            prev.rmdir()
        except OSError:  # something that is not littune's: left alone
            pass


def _previous_plan(out: Path) -> dict | None:
    """The plan of what ``out`` holds or was computing (None: nothing, or unreadable)."""
    try:
        if (out / PLAN).exists():
            return json.loads((out / PLAN).read_text())
        if (out / MANIFEST).exists():
            return json.loads((out / MANIFEST).read_text()).get("plan")
    except ValueError:
        return None
    return None


def prepare(out: Path, plan: dict, resume: bool, keep_previous: bool = False) -> None:
    """Rank 0: check or reset the directory for ``plan`` and write plan.json (``keep_previous``: see :func:`clear`)."""
    if out.exists() and not out.is_dir():
        raise LittuneError(f"cache directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    old = _previous_plan(out)
    if resume and old is not None and plan_hash(old) != plan_hash(plan):
        why = ""
        if old.get("tower_fingerprint") != plan["tower_fingerprint"] and old_fingerprint_rule(
                old.get("tower_fingerprint"), old.get("fingerprint_scheme", 1)):
            why = f" (it was made {OLD_RULE})"
        raise LittuneError(f"cache {out} was started with other settings ({'; '.join(plan_differences(old, plan))})"
                           f"{why}; choose another --out, or pass --no-resume to overwrite it (the images it holds "
                           "are copied, not embedded again, where the tower and pre-processing are the same)")
    if not resume or old is None:
        clear(out, keep_previous)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    for p in (out / SHARD_DIR).iterdir():  # leftovers of a killed run are never trusted
        if ".tmp-" in p.name:
            p.unlink(missing_ok=True)
    for p in out.iterdir():
        if ".tmp-" in p.name and p.is_file():
            p.unlink(missing_ok=True)
    write_json(out / PLAN, plan)
