"""Readers for the places image-text pairs live, all yielding :class:`~littune.data.records.Record`.

:func:`open_source` looks at a path and picks the reader:

* ``pairs.csv`` / ``pairs.tsv`` -- a header row, an image column and a caption column (names
  configurable, common names found automatically), image paths relative to the file;
* ``pairs.jsonl`` -- one JSON object per line, the caption a string or a list of strings;
* ``shards-{000..009}.tar``, ``shards/*.tar``, a single ``.tar`` or a folder of ``.tar`` files -- webdataset
  shards, ``key.jpg|png|webp`` next to ``key.txt`` (one caption per line) or ``key.json``
  (``{"caption": ...}`` or ``{"captions": [...]}``);
* a folder of images with sidecar captions ``photo.txt`` (or ``photo.jpg.txt``) next to ``photo.jpg``;
* ``captions_train2017.json`` -- COCO-style captions (``images`` + ``annotations``), images found
  next to the file, in ``../train2017/`` or wherever ``image_root`` says.

A ``"type:path"`` prefix (``csv:list.txt``) or a dict ``{"type": "csv", "path": ..., ...options}``
forces a reader. Every reader groups by image: an image listed on several rows, or with a list of
captions, becomes one record holding all of them (in order, exact duplicates dropped), so training
can sample among them. Records come in a deterministic order (file order; sorted for folders).

Problems in the index itself -- a row with no image, captions with no image in a tar -- do not stop
anything: they are collected in :attr:`Source.problems` (``(where, reason)``) and reported with the
images that fail to decode. Structural errors (a missing column, a line that is not JSON) raise
:class:`~littune.errors.LittuneError` naming the file and line.

Fingerprints. :meth:`Source.fingerprint` (``<type>-<16 hex digits>``) ties an embedding cache to what
was read. It is a sha256 over the reader type; the options that change how the index is parsed
(``image_column``, ``caption_column``, ``caption_sep``, ``delimiter``, as far as the reader uses them);
the index file's whole content (CSV/TSV, JSONL, COCO JSON); each tar shard's file name, byte size and
``mtime_ns``, in order; then every record in order: its key, its captions, its tar member size, and for
an image in its own file that file's byte size and ``mtime_ns`` -- one ``stat`` per image, no image
bytes read (``-1`` for a file that cannot be stat'ed). Every other option (``image_root``,
``encoding``) acts through what it makes the records and stamps. So where the images are counts
through the files found there: the same index pointed at other files, or an image rewritten or
touched, gives another fingerprint. Absolute paths do not enter: a copy that keeps sizes and mtimes
(``cp -a``, ``rsync -a``, ``shutil.copytree``) is the same source, and a dataset may move without
invalidating its cache.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from ..hashing import hash_file
from ..errors import ConfigError, LittuneError
from .decode import IMAGE_EXTENSIONS
from .records import Record

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "file_name", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "label")
TAR_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_FINGERPRINT_VERSION = "2"


def _clean_captions(values: list[Any], sep: str | None = None) -> list[str]:
    out: list[str] = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(_clean_captions(list(v), sep))
            continue
        parts = str(v).split(sep) if sep else [str(v)]
        out.extend(p.strip() for p in parts)
    seen: set[str] = set()
    return [c for c in out if c and not (c in seen or seen.add(c))]


class Source:
    """A collection of images with captions. Subclasses implement :meth:`_load` (and ``_content``)."""

    type: str = "source"
    #: options that change which records come out (they enter the fingerprint)
    _record_options: tuple[str, ...] = ()

    def __init__(self, path: str | Path, **options: Any):
        self.path = str(path)
        self.options = options
        self.problems: list[tuple[str, str]] = []
        self._records: list[Record] | None = None
        self._fingerprint: str | None = None

    # -- the public interface ----------------------------------------------------------------
    def records(self) -> list[Record]:
        """All records, materialised once (the list is shared: do not mutate it)."""
        if self._records is None:
            self.problems = []
            self._records = self._load()
        return self._records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())

    def __len__(self) -> int:
        """Number of distinct images."""
        return len(self.records())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def describe(self) -> str:
        return f"{self.type}:{self.path}"

    def fingerprint(self) -> str:
        """``<type>-<sha256 prefix>`` over the records, the index and the image files' stamps.

        See "Fingerprints" in the module docstring for exactly what enters it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"littune-source-v{_FINGERPRINT_VERSION}|{self.type}|".encode())
            opts = {k: self.options.get(k) for k in self._record_options}
            h.update(json.dumps(opts, sort_keys=True, default=str).encode())
            for part in self._content():
                h.update(part)
            for r in self.records():
                stamp = _stamp(r.path) if r.path is not None else None
                h.update(json.dumps([r.key, r.captions, r.size, stamp], ensure_ascii=False).encode())
            self._fingerprint = f"{self.type}-{h.hexdigest()[:16]}"
        return self._fingerprint

    def caption_count(self) -> int:
        return sum(len(r.captions) for r in self.records())

    # -- for subclasses ----------------------------------------------------------------------
    def _load(self) -> list[Record]:  # pragma: no cover - interface
        raise NotImplementedError

    def _content(self) -> Iterator[bytes]:
        """Bytes that identify the source's content beyond the record list (e.g. an index file's hash)."""
        return iter(())

    def _problem(self, where: str, reason: str) -> None:
        self.problems.append((where, reason))


def _file_digest(path: str) -> bytes:
    return bytes.fromhex(hash_file(path))


def _stamp(path: str) -> list[int]:
    """``[size, mtime_ns]`` of a file from one ``stat`` (no reading); ``[-1, -1]`` if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


class _Grouper:
    """Merge records that name the same image, keeping first-appearance order."""

    def __init__(self):
        self.by_key: dict[str, Record] = {}

    def add(self, key: str, captions: list[str], **where: Any) -> None:
        rec = self.by_key.get(key)
        if rec is None:
            self.by_key[key] = Record(key=key, captions=list(captions), **where)
        else:
            seen = set(rec.captions)
            rec.captions.extend(c for c in captions if not (c in seen or seen.add(c)))

    def records(self) -> list[Record]:
        return list(self.by_key.values())


def _norm(image: str) -> str:
    """One spelling per file: ``./img//a.jpg`` and ``img/a.jpg`` are the same image (URLs untouched)."""
    return image if "://" in image else os.path.normpath(image).replace(os.sep, "/")


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _pick_column(names: list[str], wanted: str | int | None, candidates: tuple[str, ...], what: str,
                 where: str) -> str | int:
    if isinstance(wanted, int):
        if not 0 <= wanted < len(names):
            raise ConfigError(f"{where}: {what} column index {wanted} is out of range "
                              f"(the file has {len(names)} columns)")
        return names[wanted]
    if wanted:
        if wanted in names:
            return wanted
        raise ConfigError(f"{where}: no {what} column {wanted!r}; the columns are {names}")
    lower = {n.lower().strip(): n for n in names}
    for c in candidates:
        if c in lower:
            return lower[c]
    opt = "image_column" if what == "image" else "caption_column"
    raise ConfigError(f"{where}: cannot tell which column holds the {what}; the columns are {names} "
                      f"(set {opt}, e.g. --{opt.replace('_', '-')} NAME)")


# ---------------------------------------------------------------------------------------------
class CSVSource(Source):
    """CSV or TSV with a header row. Options: ``image_column``, ``caption_column`` (``None``/``""``
    for an unlabeled list), ``caption_sep`` (split one cell into several captions), ``delimiter``,
    ``image_root`` (base of relative paths; default the file's folder), ``encoding``."""

    type = "csv"
    _record_options = ("image_column", "caption_column", "caption_sep", "delimiter")

    def _load(self) -> list[Record]:
        path = self.path
        o = self.options
        delimiter = o.get("delimiter") or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
        base = Path(o.get("image_root") or Path(path).parent)
        sep = o.get("caption_sep")
        unlabeled = "caption_column" in o and o["caption_column"] in (None, "", False)
        group = _Grouper()
        try:
            f = open(path, newline="", encoding=o.get("encoding", "utf-8-sig"))
        except FileNotFoundError:
            raise LittuneError(f"source not found: {path}") from None
        with f:
            reader = csv.reader(f, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                raise LittuneError(f"{path} is empty (expected a header row such as 'image,caption')") from None
            except UnicodeDecodeError as e:
                raise LittuneError(f"{path} is not UTF-8 text ({e.reason}); set encoding=...") from None
            img_col = _pick_column(header, o.get("image_column"), IMAGE_COLUMNS, "image", path)
            ii = header.index(img_col)
            ci = None
            if not unlabeled:
                ci = header.index(_pick_column(header, o.get("caption_column"), CAPTION_COLUMNS, "caption", path))
            try:
                for row in reader:
                    line = reader.line_num
                    if not row or all(not c.strip() for c in row):
                        continue
                    image = row[ii].strip() if ii < len(row) else ""
                    if not image:
                        self._problem(f"{path}:{line}", "row without an image")
                        continue
                    caps = _clean_captions([row[ci]] if ci is not None and ci < len(row) else [], sep)
                    image = _norm(image)
                    group.add(image, caps, path=_resolve(base, image))
            except csv.Error as e:
                raise LittuneError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
            except UnicodeDecodeError as e:
                raise LittuneError(f"{path}: not UTF-8 text near line {reader.line_num} ({e.reason})") from None
        return group.records()

    def _content(self) -> Iterator[bytes]:
        yield _file_digest(self.path)


class JSONLSource(Source):
    """One JSON object per line. Options: ``image_column`` (key of the image path), ``caption_column``
    (key of a caption string or list), ``image_root``."""

    type = "jsonl"
    _record_options = ("image_column", "caption_column", "caption_sep")

    def _load(self) -> list[Record]:
        path, o = self.path, self.options
        base = Path(o.get("image_root") or Path(path).parent)
        unlabeled = "caption_column" in o and o["caption_column"] in (None, "", False)
        group = _Grouper()
        img_key = o.get("image_column")
        cap_key = o.get("caption_column")
        try:
            f = open(path, encoding=o.get("encoding", "utf-8-sig"))
        except FileNotFoundError:
            raise LittuneError(f"source not found: {path}") from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LittuneError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise LittuneError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
                keys = list(obj)
                if img_key is None:
                    img_key = _pick_column(keys, None, IMAGE_COLUMNS, "image", f"{path}:{n}")
                if cap_key is None and not unlabeled:
                    cap_key = _pick_column(keys, None, CAPTION_COLUMNS, "caption", f"{path}:{n}")
                image = obj.get(img_key)
                if not isinstance(image, str) or not image.strip():
                    self._problem(f"{path}:{n}", f"no image ({img_key!r} missing or empty)")
                    continue
                caps = [] if unlabeled else _clean_captions([obj.get(cap_key)], o.get("caption_sep"))
                image = _norm(image.strip())
                group.add(image, caps, path=_resolve(base, image))
        return group.records()

    def _content(self) -> Iterator[bytes]:
        yield _file_digest(self.path)


class FolderSource(Source):
    """A folder (searched recursively, in sorted relative-path order, hidden entries ignored) of
    images with optional sidecar captions: ``name.txt`` or ``name.jpg.txt``, one caption per line.
    Images with no sidecar get no captions (an unlabeled set, fine for ``littune index``)."""

    type = "folder"

    def _load(self) -> list[Record]:
        root = Path(self.path)
        records = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names = set(filenames)
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, name)
                caps: list[str] = []
                for side in (name + ".txt", os.path.splitext(name)[0] + ".txt"):
                    if side in names:
                        caps = _read_caption_file(os.path.join(dirpath, side), self)
                        break
                rel = Path(full).relative_to(root).as_posix()
                records.append(Record(key=rel, captions=caps, path=full))
        return sorted(records, key=lambda r: r.key)


def _read_caption_file(path: str, source: Source) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return _clean_captions(f.read().splitlines())
    except UnicodeDecodeError:
        source._problem(path, "caption file is not UTF-8 text")
        return []


class COCOSource(Source):
    """COCO captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``caption``). Option ``image_root``; by default the images are looked for next to
    the file, in ``<split>/`` or ``../<split>/`` (``captions_val2017.json`` -> ``val2017``)."""

    type = "coco"

    def _load(self) -> list[Record]:
        path = self.path
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LittuneError(f"source not found: {path}") from None
        except json.JSONDecodeError as e:
            raise LittuneError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or "images" not in data:
            raise LittuneError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
        images = data["images"]
        by_id: dict[Any, list[str]] = {}
        for a in data.get("annotations", []):
            if "image_id" not in a:
                raise LittuneError(f"{path}: annotation without image_id: {str(a)[:100]}")
            by_id.setdefault(a["image_id"], []).append(a.get("caption", ""))
        root = self._image_root(images)
        group = _Grouper()
        for i, im in enumerate(images):
            name = im.get("file_name")
            if not name:
                self._problem(f"{path}:images[{i}]", "image entry without file_name")
                continue
            group.add(name, _clean_captions(by_id.get(im.get("id"), [])), path=_resolve(root, name))
        known = {im.get("id") for im in images}
        orphans = [k for k in by_id if k not in known]
        for k in orphans:
            self._problem(f"{path}:image_id={k}", "captions for an image_id not in 'images'")
        return group.records()

    def _image_root(self, images: list[dict]) -> Path:
        if self.options.get("image_root"):
            return Path(self.options["image_root"])
        here = Path(self.path).parent
        m = re.match(r"(?:captions|image_info)_(.+)\.json$", Path(self.path).name)
        candidates = [here]
        if m:
            candidates += [here / m.group(1), here.parent / m.group(1)]
        candidates += [here / "images", here.parent / "images", here.parent]
        probe = next((im.get("file_name") for im in images if im.get("file_name")), None)
        if probe:
            for c in candidates:
                if (c / probe).exists():
                    return c
        return here

    def _content(self) -> Iterator[bytes]:
        yield _file_digest(self.path)


# ---------------------------------------------------------------------------------------------
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
        return f"webdataset:{self.path} ({len(self.shards)} shards)"

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
                image.captions = caps
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
                yield key, entry.get("image"), _clean_captions(entry.get("captions", []))

    def _captions(self, raw: bytes, ext: str, where: str) -> list[str]:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            self._problem(where, "caption member is not UTF-8 text")
            return []
        if ext != "json":
            return text.splitlines()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            self._problem(where, f"caption JSON is invalid ({e.msg})")
            return []
        if isinstance(obj, dict):
            col = self.options.get("caption_column")
            for k in ([col] if col else []) + ["captions", "caption", "text", "txt"]:
                if k in obj:
                    return _clean_captions([obj[k]])
            return []
        return _clean_captions([obj])

    def _content(self) -> Iterator[bytes]:
        for s in self.shards:
            size, mtime_ns = _stamp(s)
            yield f"{Path(s).name}:{size}:{mtime_ns}|".encode()


# ---------------------------------------------------------------------------------------------
SOURCE_TYPES: dict[str, type[Source]] = {
    "csv": CSVSource,
    "tsv": CSVSource,
    "jsonl": JSONLSource,
    "webdataset": WebDatasetSource,
    "wds": WebDatasetSource,
    "tar": WebDatasetSource,
    "folder": FolderSource,
    "coco": COCOSource,
}


def detect_type(path: str) -> str:
    """The reader for a path: by extension, brace/glob pattern or folder contents."""
    low = path.lower()
    if re.search(r"\{[^{}]*(\.\.|,)[^{}]*\}", path) or (any(ch in path for ch in "*?") and ".tar" in low):
        return "webdataset"
    if low.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if low.endswith((".csv", ".tsv", ".tab")):
        return "csv"
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if low.endswith(".json"):
        return "coco"
    if os.path.isdir(path):
        entries = [e.name for e in os.scandir(path) if not e.name.startswith(".")]
        files = [e for e in entries if os.path.isfile(os.path.join(path, e))]
        if files and all(e.endswith((".tar", ".tar.gz", ".tgz")) for e in files):
            return "webdataset"
        return "folder"
    if not os.path.exists(path):
        raise LittuneError(f"source not found: {path}")
    raise LittuneError(f"cannot tell the format of {path}: use a .csv/.tsv, .jsonl, .tar (or a brace pattern), "
                       "a COCO captions .json or a folder of images, or prefix the type (csv:{path})")


def open_source(spec: str | Path | dict | Source, **options: Any) -> Source:
    """Open a source of image-text pairs; the format comes from the path (see the module docstring).

    ``spec`` may be a path, ``"type:path"``, or ``{"type": ..., "path": ..., **options}``. Options:
    ``image_column``, ``caption_column``, ``caption_sep``, ``delimiter``, ``image_root``, ``encoding``.
    """
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        if "path" not in spec:
            raise ConfigError(f"a source dict needs a 'path': {spec}")
        path = spec.pop("path")
        kind = spec.pop("type", None)
        options = {**spec, **options}
    else:
        path, kind = str(spec), None
        prefix, sep, rest = path.partition(":")
        if sep and prefix.lower() in SOURCE_TYPES and rest:
            kind, path = prefix.lower(), rest
    if isinstance(path, (list, tuple)):
        kind = kind or "webdataset"
    else:
        path = os.path.expanduser(str(path))
        kind = kind or detect_type(path)
        if kind not in ("webdataset", "wds", "tar") and not os.path.exists(path):
            raise LittuneError(f"source not found: {path}")
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"unknown source type {kind!r}; use one of {', '.join(sorted(set(SOURCE_TYPES)))}")
    known = {"image_column", "caption_column", "caption_sep", "delimiter", "image_root", "encoding"}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown source option(s) {sorted(unknown)}; use {sorted(known)}")
    return SOURCE_TYPES[kind](path, **options)
