"""Tabular indexes: CSV/TSV with a header row and JSONL, one image path and its caption(s) per row.

The image and caption columns are named by the options or found among common names
(:data:`IMAGE_COLUMNS`, :data:`CAPTION_COLUMNS`); image paths are relative to the index file, or to
``image_root``. Rows that repeat an image are merged into one record.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, LittuneError
from .base import RecordGrouper, Source, clean_captions, file_digest, normalise_key, resolve_path
from .records import Record

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "path", "file", "filename", "file_name", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "label")


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
            return open(self.path, encoding=self.options.get("encoding", "utf-8-sig"), **kw)
        except FileNotFoundError:
            raise LittuneError(f"source not found: {self.path}") from None

    def _image_base(self) -> Path:
        return Path(self.options.get("image_root") or Path(self.path).parent)

    def _unlabeled(self) -> bool:
        """``caption_column=None`` (or ``""``) given explicitly: a plain list of images."""
        return "caption_column" in self.options and self.options["caption_column"] in (None, "", False)

    def _content(self) -> Iterator[bytes]:
        yield file_digest(self.path)


class CSVSource(_TabularSource):
    """CSV or TSV with a header row. Options: ``image_column``, ``caption_column`` (``None``/``""``
    for an unlabeled list), ``caption_sep`` (split one cell into several captions), ``delimiter``,
    ``image_root`` (base of relative paths; default the file's folder), ``encoding``."""

    type = "csv"
    _record_options = ("image_column", "caption_column", "caption_sep", "delimiter")

    def _load(self) -> list[Record]:
        path, o = self.path, self.options
        delimiter = o.get("delimiter") or ("\t" if path.lower().endswith((".tsv", ".tab")) else ",")
        base, sep = self._image_base(), o.get("caption_sep")
        group = RecordGrouper()
        with self._open(newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            ii, ci = self._columns(reader)
            try:
                for row in reader:
                    if not row or all(not c.strip() for c in row):
                        continue
                    image = row[ii].strip() if ii < len(row) else ""
                    if not image:
                        self._problem(f"{path}:{reader.line_num}", "row without an image")
                        continue
                    caps = clean_captions([row[ci]] if ci is not None and ci < len(row) else [], sep)
                    image = normalise_key(image)
                    group.add(image, caps, path=resolve_path(base, image))
            except csv.Error as e:
                raise LittuneError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
            except UnicodeDecodeError as e:
                raise LittuneError(f"{path}: not UTF-8 text near line {reader.line_num} ({e.reason})") from None
        return group.records()

    def _columns(self, reader) -> tuple[int, int | None]:
        """Read the header row: the image column's index and the caption column's (``None``: unlabeled)."""
        path, o = self.path, self.options
        try:
            header = next(reader)
        except StopIteration:
            raise LittuneError(f"{path} is empty (expected a header row such as 'image,caption')") from None
        except UnicodeDecodeError as e:
            raise LittuneError(f"{path} is not UTF-8 text ({e.reason}); set encoding=...") from None
        ii = header.index(_pick_column(header, o.get("image_column"), IMAGE_COLUMNS, "image", path))
        if self._unlabeled():
            return ii, None
        return ii, header.index(_pick_column(header, o.get("caption_column"), CAPTION_COLUMNS, "caption", path))


class JSONLSource(_TabularSource):
    """One JSON object per line. Options: ``image_column`` (key of the image path), ``caption_column``
    (key of a caption string or list), ``caption_sep``, ``image_root``, ``encoding``."""

    type = "jsonl"
    _record_options = ("image_column", "caption_column", "caption_sep")

    def _load(self) -> list[Record]:
        path, o = self.path, self.options
        base, unlabeled = self._image_base(), self._unlabeled()
        group = RecordGrouper()
        img_key, cap_key = o.get("image_column"), o.get("caption_column")
        with self._open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = _json_object(line, f"{path}:{n}")
                if img_key is None:
                    img_key = _pick_column(list(obj), None, IMAGE_COLUMNS, "image", f"{path}:{n}")
                if cap_key is None and not unlabeled:
                    cap_key = _pick_column(list(obj), None, CAPTION_COLUMNS, "caption", f"{path}:{n}")
                image = obj.get(img_key)
                if not isinstance(image, str) or not image.strip():
                    self._problem(f"{path}:{n}", f"no image ({img_key!r} missing or empty)")
                    continue
                caps = [] if unlabeled else clean_captions([obj.get(cap_key)], o.get("caption_sep"))
                image = normalise_key(image.strip())
                group.add(image, caps, path=resolve_path(base, image))
        return group.records()


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LittuneError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise LittuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
