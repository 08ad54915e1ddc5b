"""Webdataset tar shards: members ``<key>.<ext>`` grouped by key into one record per image.

Shards are named by a brace pattern (``shards-{000..009}.tar``), a glob, a folder of ``.tar``
files, a single tar or a list. Uncompressed shards are indexed without reading image bytes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import LittuneError
from .base import Source, clean_captions, file_stamp, printable
from .decode import IMAGE_EXTENSIONS
from .records import Record
from .tabular import LANG_COLUMNS, row_langs

TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
#: keys of a caption JSON member that give its captions' languages (one string, or a list parallel to
#: a caption list), as a JSONL row's: ``lang_column`` or one of these
LANGS_KEYS = ("langs", *LANG_COLUMNS)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` (zero-padded numeric ranges) and ``{a,b,c}`` alternatives, left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]
        return [head + items[0] + t for t in expand_braces(tail)]
    return [head + it + t for it in items for t in expand_braces(tail)]


def _with_langs(pairs: list[tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """Captions (stripped, blanks and repeats dropped, the first language of a repeat kept) and their
    languages, parallel (``""`` unknown), or ``[]`` when no member names a language."""
    caps, langs, seen = [], [], set()
    for cap, lang in pairs:
        cap = str(cap).strip()
        if cap and cap not in seen:
            seen.add(cap)
            caps.append(cap)
            langs.append(lang)
    return caps, ([lang or "" for lang in langs] if any(lang is not None for lang in langs) else [])


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        magic = f.read(6)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"


class WebDatasetSource(Source):
    """Webdataset tar shards: members ``<key>.<ext>`` grouped by key (the name up to the first dot
    of the file name). Image ``jpg|jpeg|png|webp|...``; captions from ``txt`` (one per line) or ``json``
    (``caption``/``captions``/``text`` or ``caption_column``; a list or a string). Uncompressed
    shards are indexed without reading image bytes (records point at byte ranges); compressed ones
    (``.tar.gz``) are read into memory."""

    type = "webdataset"
    _record_options = ("caption_column",)
    _later_record_options = ("lang_column",)

    def __init__(self, path: str | Path | list, **options: Any):
        shards = [str(p) for p in path] if isinstance(path, (list, tuple)) else None
        super().__init__(path if shards is None else ",".join(shards), **options)
        self.shards = shards if shards is not None else self._expand(str(path))

    @staticmethod
    def _expand(spec: str) -> list[str]:
        if os.path.isdir(spec):
            shards = sorted(str(p) for p in Path(spec).iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
            if not shards:
                raise LittuneError(f"{spec} holds no .tar shards")
            return shards
        shards = []
        for p in expand_braces(spec):
            if any(ch in p for ch in "*?["):
                shards.extend(sorted(glob.glob(p)))
            else:
                shards.append(p)
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise LittuneError(f"{len(missing)} of {len(shards)} shards of {spec} not found, e.g. {missing[0]}")
        if not shards:
            raise LittuneError(f"no shard matches {spec}")
        return shards

    def describe(self) -> str:
        return printable(f"webdataset:{self.path} ({len(self.shards)} shards)")

    def _load(self) -> list[Record]:
        group: dict[str, Record] = {}
        for shard in self.shards:
            for key, image, caps in self._scan(shard):
                if image is None:
                    self._problem(f"{shard}:{key}", "captions without an image")
                    continue
                if key in group:
                    key = f"{Path(shard).name}/{key}"  # the same stem in another shard is another image
                image.key = key
                image.captions, image.langs = caps
                group[key] = image
        return list(group.values())

    def _scan(self, shard: str) -> Iterator[tuple[str, Record | None, list[str]]]:
        compressed = _is_compressed(shard)
        items: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{d}/{stem}" if d else stem
                    ext = ext.lower()
                    entry = items.setdefault(key, {})
                    if ext in TAR_IMAGE_EXTS:
                        if "image" in entry:  # prefer the first image member of a key
                            continue
                        if compressed:
                            entry["image"] = Record(key=key, data=tf.extractfile(m).read(), size=m.size)
                        else:
                            entry["image"] = Record(key=key, shard=shard, offset=m.offset_data, size=m.size)
                    elif ext in ("txt", "json", "caption", "cap"):
                        raw = tf.extractfile(m).read()
                        entry.setdefault("captions", []).extend(self._captions(raw, ext, f"{shard}:{m.name}"))
        except tarfile.TarError as e:
            raise LittuneError(f"{shard}: not a readable tar file ({e})") from None
        for key, entry in items.items():
            if "image" in entry or entry.get("captions"):
                yield key, entry.get("image"), _with_langs(entry.get("captions", []))

    def _captions(self, raw: bytes, ext: str, where: str) -> list[tuple[str, str | None]]:
        """``(caption, language or None)`` pairs of a caption member."""
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            self._problem(where, "caption member is not UTF-8 text")
            return []
        if ext != "json":
            return [(line, None) for line in text.splitlines()]
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            self._problem(where, f"caption JSON is invalid ({e.msg})")
            return []
        if not isinstance(obj, dict):
            return [(c, None) for c in clean_captions([obj])]
        col = self.options.get("caption_column")
        key = next((k for k in ([col] if col else []) + ["captions", "caption", "text", "txt"] if k in obj), None)
        if key is None:
            return []
        caps = clean_captions([obj[key]])
        lang_key = self.options.get("lang_column") or next((k for k in obj if k.lower() in LANGS_KEYS), None)
        if not lang_key or obj.get(lang_key) is None:
            return [(c, None) for c in caps]
        try:
            return list(zip(caps, row_langs(obj, lang_key, obj[key], caps, where)))
        except LittuneError as e:
            self._problem(where, str(e).split(": ", 1)[-1])
            return [(c, None) for c in caps]

    def _content(self) -> Iterator[bytes]:
        for s in self.shards:
            size, mtime_ns = file_stamp(s)
            yield f"{Path(s).name}:{size}:{mtime_ns}|".encode("utf-8", "surrogateescape")

