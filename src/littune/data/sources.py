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

:meth:`Source.fingerprint` ties an embedding cache to what was read (the index, the image files'
sizes and mtimes, the shards'); :mod:`littune.data.base` states the rule. The readers live in
:mod:`~littune.data.tabular` (CSV/TSV, JSONL), :mod:`~littune.data.shards` (webdataset tars) and
:mod:`~littune.data.folders` (image folders, COCO); this module picks one and re-exports them all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LittuneError
from .base import Source
from .folders import COCOSource, FolderSource
from .shards import TAR_IMAGE_EXTS, WebDatasetSource, expand_braces
from .tabular import CAPTION_COLUMNS, IMAGE_COLUMNS, CSVSource, JSONLSource

__all__ = ["CAPTION_COLUMNS", "IMAGE_COLUMNS", "SOURCE_OPTIONS", "SOURCE_TYPES", "TAR_IMAGE_EXTS", "COCOSource",
           "CSVSource", "FolderSource", "JSONLSource", "Source", "WebDatasetSource", "detect_type",
           "expand_braces", "open_source"]

#: every option :func:`open_source` accepts (each reader uses the ones its docstring names)
SOURCE_OPTIONS = ("image_column", "caption_column", "caption_sep", "delimiter", "image_root", "encoding",
                  "lang_column")

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
    ``image_column``, ``caption_column``, ``caption_sep``, ``delimiter``, ``image_root``, ``encoding``,
    ``lang_column`` (CSV and JSONL).
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
    unknown = set(options) - set(SOURCE_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown source option(s) {sorted(unknown)}; use {sorted(SOURCE_OPTIONS)}")
    return SOURCE_TYPES[kind](path, **options)
