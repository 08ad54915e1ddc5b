"""Finding and filtering the Openclipart drawings.

Openclipart 0.18 ships in Debian as ``openclipart-svg``: 8,121 public-domain SVG drawings in a
category tree (``animals/birds``, ``food/fruit``...). :func:`fetch_source` gets the package once
with ``apt-get download`` + ``dpkg-deb -x`` (no root needed) into the littune cache, or reads a
folder or ``.deb`` given as the source. :func:`scan` drops what is not a picture of something:
symlinked and byte-identical duplicates, the icon themes (any ``icons`` category), the generated
star shapes (``shapes/stars``), the gradient swatches (``special/gradients``), and the files
:func:`~littune.builders.openclipart.clips.parse_clip` rejects, each with its reason. A title
shared by three or more files is a collection name ("AIGA Symbol Signs", "card"): those drawings
are titled by their file name, e.g. "aiga escalator (AIGA Symbol Signs)", and descriptions shared
by three or more files are boilerplate and dropped.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections import Counter
from pathlib import Path

from ...errors import LittuneError
from ..fetch import fetch_deb
from .clips import Clip, parse_clip

DEB_PACKAGE = "openclipart-svg"
SVG_ROOT = Path("usr/share/openclipart/svg")
DROP_CATEGORIES = (
    (re.compile(r"(^|/)icons(/|$)"), "icon (icon theme category)"),
    (re.compile(r"^shapes/stars(/|$)"), "star shape (generated series)"),
    (re.compile(r"^special/gradients(/|$)"), "gradient swatch, not a drawing"),
    (re.compile(r"^unsorted/duplicates(/|$)"), "duplicate (unsorted/duplicates)"),
)


def fetch_source(source: str | Path | None, cache_root: Path, log) -> Path:
    """The unpacked package or SVG folder: ``source`` (a folder or an ``openclipart-svg_*.deb``),
    else fetched with apt-get into ``<cache>/deb/``."""
    if source is None:
        return fetch_deb(DEB_PACKAGE, cache_root, log=log)
    source = Path(source).expanduser()
    if source.is_file() and source.suffix == ".deb":
        return fetch_deb(DEB_PACKAGE, cache_root, deb_file=source, log=log)
    if source.is_dir():
        return source
    raise LittuneError(f"--source {source}: not a folder or a .deb file")


def find_svg_root(source: Path) -> Path:
    """The folder holding the SVG tree inside an unpacked package (or ``source`` itself)."""
    for cand in (source / SVG_ROOT, source / "svg", source):
        if cand.is_dir() and any(cand.rglob("*.svg")):
            return cand
    raise LittuneError(f"--source {source}: no .svg files found")


def scan(root: Path) -> tuple[list[Clip], list[tuple[str, str]], int]:
    """Walk the tree: usable clips (sorted by id), ``(relative path, reason)`` for the rest, file count."""
    from tqdm import tqdm

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".svg")
    clips, skipped = [], []
    first_of: dict[str, str] = {}
    for p in tqdm(files, desc="openclipart: reading", unit="file", file=sys.stderr, disable=None, mininterval=0.5):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            target = os.path.relpath(p.resolve(), root)
            skipped.append((rel, f"duplicate: symlink to {target}"))
            continue
        if not p.is_file():
            continue
        category = p.relative_to(root).parent.as_posix()
        reason = next((why for rx, why in DROP_CATEGORIES if rx.search(category)), None)
        if reason:
            skipped.append((rel, reason))
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest in first_of:
            skipped.append((rel, f"duplicate: same bytes as {first_of[digest]}"))
            continue
        first_of[digest] = rel
        clip, reason = parse_clip(p, root)
        if reason:
            skipped.append((rel, reason))
        else:
            clips.append(clip)
    _name_series(clips)
    ids = Counter(c.id for c in clips)
    for c in clips:  # ids are unique by construction unless odd characters collapsed
        if ids[c.id] > 1:
            c.id = f"{c.id}_{hashlib.sha256(str(c.path).encode()).hexdigest()[:8]}"
    return sorted(clips, key=lambda c: c.id), skipped, len(files)


def stem_words(path: Path, creator: str = "") -> str:
    """Words of a file name, without the ``_01`` suffix and the author's name: a fallback title."""
    words = path.stem.replace("_", " ").replace("-", " ").split()
    drop = {w.lower() for w in creator.split() if len(w) > 2}
    words = [w for w in words if w.lower() not in drop]
    while words and re.fullmatch(r"0\d|\d{3,}", words[-1]):
        words.pop()
    text = " ".join(words)
    return re.sub(r"(?<=[a-z])\d+$", "", text).strip()


def _name_series(clips: list[Clip], min_shared: int = 3) -> None:
    """Collection titles ("AIGA Symbol Signs" on 122 files) get the file name in front; boilerplate
    descriptions shared by several files are dropped."""
    titles = Counter(c.title.casefold() for c in clips)
    descs = Counter(c.description.casefold() for c in clips if c.description)
    for c in clips:
        if descs.get(c.description.casefold(), 0) >= min_shared:
            c.description = ""
        if titles[c.title.casefold()] >= min_shared:
            words = stem_words(c.path, c.creator)
            if words and words.casefold() != c.title.casefold():
                c.series = c.title
                c.title = f"{words} ({c.title})"

