"""What every source is: a list of :class:`~littune.data.records.Record` (one per image, all of its
captions), the problems met reading the index, and a fingerprint of what was read.

Fingerprints. :meth:`Source.fingerprint` (``<type>-<16 hex digits>``) ties an embedding cache to what
was read. It is a sha256 over the reader type; the options that change how the index is parsed
(``image_column``, ``caption_column``, ``caption_sep``, ``delimiter``, as far as the reader uses them);
the index file's whole content (CSV/TSV, JSONL, COCO JSON); each tar shard's file name, byte size and
``mtime_ns``, in order; then every record in order: its key, its captions, its tar member size, for
an image in its own file that file's byte size and ``mtime_ns``, and its captions' languages where the
source names them -- one ``stat`` per image, no image
bytes read (``-1`` for a file that cannot be stat'ed). Every other option (``image_root``,
``encoding``) acts through what it makes the records and stamps. So where the images are counts
through the files found there: the same index pointed at other files, or an image rewritten or
touched, gives another fingerprint. Absolute paths do not enter: a copy that keeps sizes and mtimes
(``cp -a``, ``rsync -a``, ``shutil.copytree``) is the same source, and a dataset may move without
invalidating its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..hashing import hash_file
from .records import Record

_FINGERPRINT_VERSION = "2"


def clean_captions(values: list[Any], sep: str | None = None) -> list[str]:
    """Flatten strings / lists (``sep`` splits a string), strip, drop blanks and repeats, keep order."""
    out: list[str] = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(clean_captions(list(v), sep))
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
    #: options added later (``lang_column``): they enter the fingerprint only when set, so a cache
    #: built before they existed keeps its fingerprint
    _later_record_options: tuple[str, ...] = ()

    def __init__(self, path: str | Path, **options: Any):
        self.path = str(path)
        self.options = options
        self.problems: list[tuple[str, str]] = []
        #: where each image left out for a name that is not UTF-8 is, shown with escapes (also in ``problems``)
        self.bad_names: list[str] = []
        self._records: list[Record] | None = None
        self._fingerprint: str | None = None

    # -- the public interface ----------------------------------------------------------------
    def records(self) -> list[Record]:
        """All records, materialised once (the list is shared: do not mutate it)."""
        if self._records is None:
            self.problems, self.bad_names = [], []
            self._records = self._text_only(self._load())
        return self._records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())

    def __len__(self) -> int:
        """Number of distinct images."""
        return len(self.records())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def describe(self) -> str:
        return printable(f"{self.type}:{self.path}")

    def fingerprint(self) -> str:
        """``<type>-<sha256 prefix>`` over the records, the index and the image files' stamps.

        See "Fingerprints" in the module docstring for exactly what enters it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"littune-source-v{_FINGERPRINT_VERSION}|{self.type}|".encode())
            opts = {k: self.options.get(k) for k in self._record_options}
            opts.update({k: self.options[k] for k in self._later_record_options if self.options.get(k)})
            h.update(json.dumps(opts, sort_keys=True, default=str).encode())
            for part in self._content():
                h.update(part)
            for r in self.records():
                stamp = file_stamp(r.path) if r.path is not None else None
                entry = [r.key, r.captions, r.size, stamp] + ([r.langs] if r.langs else [])
                h.update(json.dumps(entry, ensure_ascii=False).encode())
            self._fingerprint = f"{self.type}-{h.hexdigest()[:16]}"
        return self._fingerprint

    def bad_names_note(self, report: str | Path) -> str | None:
        """One line saying how many images were left out for a name that is not UTF-8 (:attr:`bad_names`),
        with the first of them, or None when there were none. ``report``: where they are all listed."""
        n = len(self.bad_names)
        if not n:
            return None
        what = "1 file whose name is" if n == 1 else f"{n:,} files whose names are"
        first = self.bad_names[0] if n == 1 else f"e.g. {self.bad_names[0]}"
        return f"left out {what} not UTF-8: {first} (rename {'it' if n == 1 else 'them'} to include " \
               f"{'it' if n == 1 else 'them'}; listed in {report})"

    def caption_count(self) -> int:
        return sum(len(r.captions) for r in self.records())

    # -- for subclasses ----------------------------------------------------------------------
    def _load(self) -> list[Record]:  # pragma: no cover - interface
        raise NotImplementedError

    def _content(self) -> Iterator[bytes]:
        """Bytes that identify the source's content beyond the record list (e.g. an index file's hash)."""
        return iter(())

    def _problem(self, where: str, reason: str) -> None:
        self.problems.append((printable(where), reason))

    def _text_only(self, records: list[Record]) -> list[Record]:
        """The records whose names are text, each caption that is not text dropped.

        A file name is bytes: Python keeps bytes that are not UTF-8 as lone surrogates, which no cache,
        index or report can write (UTF-8 throughout). Such a record is left out and listed in
        :attr:`problems` and :attr:`bad_names`, its bytes shown as ``\\x`` escapes. A caption holding a
        lone surrogate (a JSON ``"\\ud800"``) is dropped and listed in :attr:`problems`."""
        kept = []
        for r in records:
            if not (is_text(r.key) and is_text(r.where)):
                self.bad_names.append(printable(r.where))
                self._problem(r.where, "file name is not UTF-8 (its bytes shown as \\x escapes); "
                                       "rename the file to include it")
                continue
            if not all(is_text(c) for c in r.captions):
                for c in r.captions:
                    if not is_text(c):
                        self._problem(r.where, f"a caption is not valid Unicode text ({printable(repr(c))}); "
                                               "caption dropped")
                good = [k for k, c in enumerate(r.captions) if is_text(c)]
                r.langs = [r.langs[k] for k in good] if r.langs else r.langs
                r.captions = [r.captions[k] for k in good]
            kept.append(r)
        return kept


def is_text(s: str) -> bool:
    """Whether ``s`` can be written as UTF-8 (no lone surrogates: a file name's undecodable bytes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(s: str) -> str:
    """``s`` as UTF-8-writable text: a file name's undecodable bytes (kept by Python as surrogates) as
    ``\\xff`` escapes, any other lone surrogate as ``\\ud800``; text that is valid stays as it is."""
    if is_text(s):
        return s
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def file_digest(path: str) -> bytes:
    """The sha256 of a whole file (an index file: CSV, JSONL, COCO JSON)."""
    return bytes.fromhex(hash_file(path))


def file_stamp(path: str) -> list[int]:
    """``[size, mtime_ns]`` of a file from one ``stat`` (no reading); ``[-1, -1]`` if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


class RecordGrouper:
    """Merge records that name the same image, keeping first-appearance order. ``base``: the folder
    that relative image paths of :meth:`add_row` are resolved against."""

    def __init__(self, base: Path | None = None):
        self.by_key: dict[str, Record] = {}
        self.base = base
        self._seen: dict[str, set[str]] = {}  # each record's captions, for the duplicate check
        self._spelling: dict[str, str] = {}  # an image as a row writes it -> its key

    def add_row(self, image: str, captions: list[str], langs: list[str] | None = None) -> None:
        """:meth:`add` for a table row naming ``image`` as written: the key is normalised once per
        spelling and the path resolved once per image (a caption table has a row per caption)."""
        key = self._spelling.get(image)
        if key is None:
            key = self._spelling[image] = normalise_key(image)
        if key in self.by_key:
            self.add(key, captions, langs)
        else:
            self.add(key, captions, langs, path=resolve_path(self.base, key))

    def add(self, key: str, captions: list[str], langs: list[str] | None = None, **where: Any) -> None:
        """Add an image's captions (``langs``: their languages, parallel; a caption already there keeps
        its first language). Languages are kept for every record once any row names one."""
        rec = self.by_key.get(key)
        if rec is None:
            rec = self.by_key[key] = Record(key=key, **where)
            self._seen[key] = set(rec.captions)
        if langs is not None and len(rec.langs) < len(rec.captions):  # earlier rows named no language
            rec.langs.extend([""] * (len(rec.captions) - len(rec.langs)))
        seen = self._seen[key]
        for k, c in enumerate(captions):
            if c not in seen:
                seen.add(c)
                rec.captions.append(c)
                if langs is not None or rec.langs:
                    rec.langs.append(langs[k] if langs is not None else "")

    def records(self) -> list[Record]:
        recs = list(self.by_key.values())
        if any(r.langs for r in recs):  # one language list per record, parallel to its captions
            for r in recs:
                r.langs.extend([""] * (len(r.captions) - len(r.langs)))
        return recs



def normalise_key(image: str) -> str:
    """One spelling per file: ``./img//a.jpg`` and ``img/a.jpg`` are the same image (URLs untouched)."""
    return image if "://" in image else os.path.normpath(image).replace(os.sep, "/")


def resolve_path(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)

