"""The cache's format on disk: names, the plan, shard commit records, the global tables, the manifest.

A cache directory holds ``plan.json`` (what is being computed), ``shards/NNNNN.npy`` (features,
``(n, 1 + views, dim)``) each followed by its commit record ``shards/NNNNN.json`` (which records
the shard covers, which of them are in it, the sha256 of the features file), then, once every shard
is complete, the key, path and caption tables, ``skipped.tsv`` and, last, ``manifest.json``. Every
file is written through :mod:`littune.fileio` (temporary name, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.decode import REASONS
from ..errors import LittuneError
from ..fileio import atomic_write, write_json, write_npy, write_skipped
from ..hashing import hash_file
from .tokens import ABOUT, SUFFIX, manifest_fields, plan_fields

FORMAT = "littune-embedding-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SKIPPED = "skipped.tsv"
LOCK = ".lock"
SHARD_DIR = "shards"
DTYPES = ("float16", "float32")
#: the reason in skipped.tsv of an image that is cached (for search) but has no caption to train on
NO_CAPTION = "no-caption"
#: each caption's language (int16 positions into the manifest's ``languages``), when the source names them
LANGS_FILE = "caption_langs.npy"
OUR_FILES = (MANIFEST, PLAN, SKIPPED, "keys.utf8", "key_offsets.npy", "paths.utf8", "path_offsets.npy",
             "captions.utf8", "caption_offsets.npy", "image_captions.npy", "source_index.npy", LANGS_FILE)
#: How tower fingerprints are made. 2: an ``hf:`` tower's name holds its pooling, a ``torch:`` tower's its pooling
#: and factory arguments. A plan or manifest without ``fingerprint_scheme`` was made under 1, where ``hf:DIR#cls``
#: and ``hf:DIR#mean`` had one fingerprint (and shared one ONNX export): such a cache is stale for those towers.
FINGERPRINT_SCHEME = 2
#: plan fields that describe rather than decide the computation (a change does not stop a resume)
_DESCRIPTIVE = ("source", "tower_spec", "preprocess", "tower_name", "fingerprint_scheme", ABOUT)


def sha256(path: Path) -> str:
    return hash_file(path)


def make_plan(tower, *, dim: int, source_fingerprint: str, source: str, records: int, shard_size: int,
              dtype: str, views: int, seed: int, max_pixels: int | None, tokens: dict | None = None) -> dict:
    """What a cache computes: the tower, the source, the shards, the stored precision and views, and with
    ``tokens`` (:func:`.tokens.resolve`'s spec) the token grid (a plan without tokens has no token field)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint_scheme": FINGERPRINT_SCHEME,
        "tower_fingerprint": tower.fingerprint(),
        "tower_name": getattr(tower, "name", type(tower).__name__),
        "tower_spec": getattr(tower, "spec", None),
        "preprocess": tower.preprocess.to_dict(),
        "dim": int(dim),
        "source_fingerprint": source_fingerprint,
        "source": source,
        "records": records,
        "shard_size": int(shard_size),
        "shards": (records + shard_size - 1) // shard_size,
        "dtype": dtype,
        "views": int(views),
        "seed": int(seed),
        "max_pixels": max_pixels,
        **plan_fields(tokens),
    }


def plan_hash(plan: dict) -> str:
    """A digest of the plan's deciding fields: a shard written under another plan is not reused."""
    core = {k: plan[k] for k in sorted(plan) if k not in _DESCRIPTIVE}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def plan_differences(old: dict, new: dict) -> list[str]:
    """``"field old -> new"`` for each deciding field that differs."""
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new})
            if k not in _DESCRIPTIVE and old.get(k) != new.get(k)]


# -- shards and their commit records -----------------------------------------------------------
def shard_paths(out: Path, s: int) -> tuple[Path, Path]:
    return out / SHARD_DIR / f"{s:05d}.npy", out / SHARD_DIR / f"{s:05d}.json"


def shard_complete(out: Path, s: int, phash: str, verify: bool = True) -> dict | None:
    """The shard's commit record if the shard is complete and its checksum matches, else None."""
    npy, js = shard_paths(out, s)
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("plan") != phash or meta.get("shard") != s or not npy.is_file():
        return None
    if npy.stat().st_size != meta.get("bytes"):
        return None
    if verify and sha256(npy) != meta.get("sha256"):
        return None
    tok = meta.get("tokens")
    if tok is not None:  # the shard's token file: covered by the same commit record
        t = npy.with_name(f"{s:05d}{SUFFIX}")
        if not t.is_file() or t.stat().st_size != tok.get("bytes") or (verify and sha256(t) != tok.get("sha256")):
            return None
    return meta


def _stored(arr: np.ndarray, np_dtype, overflow: str, fix: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is caught just below, with a clear message
        stored = arr.astype(np_dtype)
    if np_dtype is np.float16 and np.isinf(stored).any() and np.isfinite(arr).all():
        raise LittuneError(f"{overflow} (max |x| = {np.abs(arr).max():.4g}); {fix}")
    return stored


def write_shard(out: Path, shard: int, arr: np.ndarray, np_dtype, phash: str, records: list[int],
                good: list[int], skipped: list, overflow: str, fix: str, runtime: str | None = None,
                tokens: np.ndarray | None = None) -> dict:
    """Write shard ``shard``: the float32 ``arr`` (count, 1 + views, dim) stored as ``np_dtype`` (and the
    ``tokens`` (count, h*w, F) as float16 beside it), then its ``.json`` (last: the shard counts as complete
    once that exists). Returns the commit record."""
    stored = _stored(arr, np_dtype, overflow, fix)
    npy, js = shard_paths(out, shard)
    tok = None
    if tokens is not None:
        t = npy.with_name(f"{shard:05d}{SUFFIX}")
        write_npy(t, _stored(tokens, np.float16, overflow.replace("features", "tokens"),
                             "the tokens are stored as float16: embed without --tokens"))
        tok = {"bytes": t.stat().st_size, "sha256": sha256(t)}
    write_npy(npy, stored)
    meta = {"shard": shard, "plan": phash, "records": records, "count": len(good), "bytes": npy.stat().st_size,
            "sha256": sha256(npy), "good": good, "skipped": skipped}
    if tok is not None:
        meta["tokens"] = tok
    if runtime:
        meta["runtime"] = runtime
    write_json(js, meta)
    return meta


def manifest_entry(shard: int, start: int, meta: dict) -> dict:
    """The manifest's line for a shard whose commit record is ``meta`` and whose first row is ``start``."""
    entry = {"file": f"{SHARD_DIR}/{shard:05d}.npy", "start": start, "count": meta["count"],
             "records": meta["records"], "bytes": meta["bytes"], "sha256": meta["sha256"]}
    if meta.get("runtime"):
        entry["runtime"] = meta["runtime"]
    if meta.get("tokens"):
        entry["tokens"] = {"file": f"{SHARD_DIR}/{shard:05d}{SUFFIX}", **meta["tokens"]}
    return entry


# -- the global tables and the manifest --------------------------------------------------------
def _write_strings(directory: Path, stem: str, offsets_name: str, strings: Sequence[str]) -> dict:
    blob = bytearray()
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    for i, s in enumerate(strings):
        blob += s.encode("utf-8")
        offsets[i + 1] = len(blob)
    atomic_write(directory / f"{stem}.utf8", bytes(blob))
    write_npy(directory / offsets_name, offsets)
    return {f"{stem}.utf8": sha256(directory / f"{stem}.utf8"), offsets_name: sha256(directory / offsets_name)}


def write_tables(out: Path, plan: dict, shards: list[dict], keys: Sequence[str], paths: Sequence[str],
                 captions: Sequence[str], captions_per_image: Sequence[int], source_index: Sequence[int],
                 skipped: Sequence = (), problems: Sequence = (), caption_langs: Sequence[str] | None = None) -> None:
    """The global key, path and caption tables, skipped.tsv and, last, the manifest of a cache whose
    shards are written (``captions``: all captions in image order, ``captions_per_image`` their counts;
    ``caption_langs``: each caption's language, stored as ``caption_langs.npy``, int16 positions into the
    manifest's ``languages``, when the source names languages).

    skipped.tsv lists the index's problems, the images left out (they did not decode) and, with
    reason ``no-caption``, the cached images that have no caption: they are never trained on."""
    files: dict[str, str] = {}
    files.update(_write_strings(out, "keys", "key_offsets.npy", keys))
    files.update(_write_strings(out, "paths", "path_offsets.npy", paths))
    files.update(_write_strings(out, "captions", "caption_offsets.npy", captions))
    per_image = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.asarray(captions_per_image, dtype=np.int64), out=per_image[1:])
    write_npy(out / "image_captions.npy", per_image)
    write_npy(out / "source_index.npy", np.asarray(source_index, dtype=np.int64))
    files["image_captions.npy"] = sha256(out / "image_captions.npy")
    files["source_index.npy"] = sha256(out / "source_index.npy")
    languages = None
    if caption_langs is not None:
        languages = sorted(set(caption_langs))
        code = {lang: k for k, lang in enumerate(languages)}
        write_npy(out / LANGS_FILE, np.asarray([code[x] for x in caption_langs], dtype=np.int16))
        files[LANGS_FILE] = sha256(out / LANGS_FILE)
    uncaptioned = [[paths[i], NO_CAPTION, "cached, not trained on"]
                   for i in np.flatnonzero(np.diff(per_image) == 0).tolist()]
    write_skipped(out / SKIPPED, [*problems, *skipped, *uncaptioned])
    manifest = _manifest(plan, shards, files, len(keys), len(captions), len(uncaptioned), skipped, problems)
    if languages is not None:
        manifest["languages"] = languages
    write_json(out / MANIFEST, manifest)


def _manifest(plan: dict, shards: list[dict], files: dict, count: int, captions: int, no_caption: int,
              skipped: Sequence, problems: Sequence) -> dict:
    reasons = Counter(r[1] for r in skipped)
    return {
        "format": FORMAT,
        "version": VERSION,
        "count": count,
        "dim": plan["dim"],
        "dtype": plan["dtype"],
        "views": plan["views"],
        "fingerprint_scheme": plan.get("fingerprint_scheme", 1),
        "tower_fingerprint": plan["tower_fingerprint"],
        "tower_name": plan["tower_name"],
        "tower_spec": plan["tower_spec"],
        "runtime": "+".join(sorted({s["runtime"] for s in shards if s.get("runtime")})) or None,
        "preprocess": plan["preprocess"],
        "source_fingerprint": plan["source_fingerprint"],
        "source": plan["source"],
        "records": plan["records"],
        "captions": captions,
        "no_caption": no_caption,
        "skipped": len(skipped),
        "skipped_by_reason": {r: reasons[r] for r in sorted(reasons, key=_reason_order)},
        "index_problems": len(problems),
        **manifest_fields(plan),
        "plan": plan,
        "shards": shards,
        "files": files,
    }


def _reason_order(r: str):
    return (REASONS.index(r) if r in REASONS else len(REASONS), r)


def summary(cache) -> str:
    """One line: what was embedded, which images have no caption (not trained on), what was skipped and why."""
    m = cache.manifest
    views = f", {m['views']} augmented views" if m["views"] else ""
    if m.get("tokens"):
        views += f", {' x '.join(map(str, m['tokens']['grid']))} x {m['tokens']['dim']} float16 tokens"
    line = f"embedded {m['count']:,} images ({m['dim']}-d {m['dtype']}{views}) into {cache.directory}"
    report = cache.directory / SKIPPED
    n_skip, n_bare = m["skipped"] + m.get("index_problems", 0), m.get("no_caption", 0)
    if n_bare:
        line += f"; {n_bare:,} without a caption (not trained on{'' if n_skip else f', see {report}'})"
    if n_skip:
        parts = [f"{n} {r}" for r, n in m["skipped_by_reason"].items()]
        if m.get("index_problems"):
            parts.append(f"{m['index_problems']} index problem{'s' if m['index_problems'] != 1 else ''}")
        line += f"; skipped {n_skip:,}: {', '.join(parts)} (see {report})"
    elif not n_bare:
        line += "; nothing skipped"
    return line
