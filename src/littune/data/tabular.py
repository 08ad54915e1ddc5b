"""Tabular indexes: CSV/TSV with a header row and JSONL, one image path and its caption(s) per row.

The image and caption columns are named by the options or found among common names
(:data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`); image paths are relative to the index file, or to
``image_root``. Rows that repeat an image are merged into one record. A language column
(``lang_column``, or one of :data:`LANG_COLUMNS`) gives each caption its language (an empty cell:
unknown), which training's ``data.language_share`` samples by. A row whose bytes are not text in the
file's encoding (a file that mixes encodings) is skipped and reported with its line; a file none of
whose rows decode is a one-line error.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, LittuneError
from .base import RecordGrouper, Source, clean_captions, file_digest
from .records import Record

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "file_name", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "label")
LANG_COLUMNS = ("lang", "language", "locale")
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that did not decode, kept by errors="surrogateescape"


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


class _TabularSource(Source):
    """What CSV and JSONL share: an index file, image paths relative to it (or ``image_root``)."""

    def _open(self, **kw):
        try:
            return open(self.path, encoding=self.options.get("encoding", "utf-8-sig"), errors="surrogateescape", **kw)
        except FileNotFoundError:
            raise LittuneError(f"source not found: {self.path}") from None

    def _image_base(self) -> Path:
        return Path(self.options.get("image_root") or Path(self.path).parent)

    def _unlabeled(self) -> bool:
        """``caption_column=None`` (or ``""``) given explicitly: a plain list of images."""
        return "caption_column" in self.options and self.options["caption_column"] in (None, "", False)

    def _content(self) -> Iterator[bytes]:
        yield file_digest(self.path)

    def _undecoded(self, where: str, text: str) -> bool:
        """Whether a row holds bytes that are not text in the file's encoding (reported, then skipped)."""
        if not _UNDECODED.search(text):
            return False
        self._problem(where, f"not {self.options.get('encoding', 'utf-8')} text (a file of mixed encodings?); row skipped")
        return True

    def _check_decoded(self, rows: int, bad: int) -> None:
        if rows and bad == rows:
            enc = self.options.get("encoding", "utf-8")
            raise LittuneError(f"{self.path} is not {enc} text (no row decodes); set encoding=...")


class CSVSource(_TabularSource):
    """CSV or TSV with a header row. Options: ``image_column``, ``caption_column`` (``None``/``""``
    for an unlabeled list), ``caption_sep`` (split one cell into several captions), ``lang_column``
    (each row's caption language), ``delimiter``, ``image_root`` (base of relative paths; default the
    file's folder), ``encoding``."""

    type = "csv"
    _record_options = ("image_column", "caption_column", "caption_sep", "delimiter")
    _later_record_options = ("lang_column",)

    def _load(self) -> list[Record]:
        path, o = self.path, self.options
        delimiter = o.get("delimiter") or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
        base, sep = self._image_base(), o.get("caption_sep")
        group, rows, bad = RecordGrouper(base), 0, 0
        with self._open(newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            ii, ci, li = self._columns(reader)
            try:
                for row in reader:
                    text = "".join(row)
                    if not text.strip():
                        continue
                    rows += 1
                    if self._undecoded(f"{path}:{reader.line_num}", text):
                        bad += 1
                        continue
                    image = row[ii].strip() if ii < len(row) else ""
                    if not image:
                        self._problem(f"{path}:{reader.line_num}", "row without an image")
                        continue
                    caps = _cell_captions(row, ci, sep)
                    langs = None if li is None else [row[li].strip() if li < len(row) else ""] * len(caps)
                    group.add_row(image, caps, langs)
            except csv.Error as e:
                raise LittuneError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        self._check_decoded(rows, bad)
        return group.records()

    def _columns(self, reader) -> tuple[int, int | None, int | None]:
        """Read the header row: the indexes of the image column, the caption column (``None``:
        unlabeled) and the language column (``None``: none)."""
        path, o = self.path, self.options
        try:
            header = next(reader)
        except StopIteration:
            raise LittuneError(f"{path} is empty (expected a header row such as 'image,caption')") from None
        if _UNDECODED.search("".join(header)):
            raise LittuneError(f"{path} is not {o.get('encoding', 'utf-8')} text (its header row); set encoding=...")
        ii = header.index(_pick_column(header, o.get("image_column"), IMAGE_COLUMNS, "image", path))
        if self._unlabeled():
            return ii, None, None
        ci = header.index(_pick_column(header, o.get("caption_column"), CAPTION_COLUMNS, "caption", path))
        return ii, ci, _lang_column(header, o.get("lang_column"), path)


class JSONLSource(_TabularSource):
    """One JSON object per line. Options: ``image_column`` (key of the image path), ``caption_column``
    (key of a caption string or list), ``caption_sep``, ``lang_column`` (key of the captions' language:
    one string for the row, or a list parallel to a caption list), ``image_root``, ``encoding``."""

    type = "jsonl"
    _record_options = ("image_column", "caption_column", "caption_sep")
    _later_record_options = ("lang_column",)

    def _load(self) -> list[Record]:
        path, o = self.path, self.options
        base, unlabeled = self._image_base(), self._unlabeled()
        group, rows, bad = RecordGrouper(base), 0, 0
        img_key, cap_key, lang_key = o.get("image_column"), o.get("caption_column"), o.get("lang_column")
        with self._open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rows += 1
                if self._undecoded(f"{path}:{n}", line):
                    bad += 1
                    continue
                obj = _json_object(line, f"{path}:{n}")
                if lang_key is None:
                    lang_key = next((k for k in obj if k.lower() in LANG_COLUMNS), False)
                if img_key is None:
                    img_key = _pick_column(list(obj), None, IMAGE_COLUMNS, "image", f"{path}:{n}")
                if cap_key is None and not unlabeled:
                    cap_key = _pick_column(list(obj), None, CAPTION_COLUMNS, "caption", f"{path}:{n}")
                image = obj.get(img_key)
                if not isinstance(image, str) or not image.strip():
                    self._problem(f"{path}:{n}", f"no image ({img_key!r} missing or empty)")
                    continue
                caps = [] if unlabeled else clean_captions([obj.get(cap_key)], o.get("caption_sep"))
                langs = row_langs(obj, lang_key, obj.get(cap_key), caps, f"{path}:{n}") if lang_key else None
                group.add_row(image.strip(), caps, langs)
        self._check_decoded(rows, bad)
        return group.records()


def _cell_captions(row: list[str], ci: int | None, sep: str | None) -> list[str]:
    """The captions of a row's caption cell: :func:`clean_captions` of it, one strip for a plain cell."""
    if ci is None or ci >= len(row):
        return []
    if sep:
        return clean_captions([row[ci]], sep)
    caption = row[ci].strip()
    return [caption] if caption else []


def _lang_column(header: list[str], wanted: str | None, where: str) -> int | None:
    """The language column's index: the one named (which must exist), else one of LANG_COLUMNS, else None."""
    if wanted:
        if wanted not in header:
            raise ConfigError(f"{where}: no language column {wanted!r}; the columns are {header}")
        return header.index(wanted)
    lower = [h.lower().strip() for h in header]
    return next((lower.index(c) for c in LANG_COLUMNS if c in lower), None)


def row_langs(obj: dict, key: str, raw, caps: list[str], where: str) -> list[str]:
    """Each caption's language in a JSONL row: one string for all, or a list parallel to the caption list."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return [(value or "").strip()] * len(caps)
    if isinstance(value, list) and isinstance(raw, list) and len(value) == len(raw):
        by_caption = {}
        for c, lang in zip(raw, value):
            by_caption.setdefault(str(c).strip(), str(lang or "").strip())
        return [by_caption.get(c, "") for c in caps]
    raise LittuneError(f"{where}: {key!r} must be a string or a list as long as the caption list")


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LittuneError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise LittuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
