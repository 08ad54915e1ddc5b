"""Openclipart drawings with their titles, keywords and descriptions as captions.

Openclipart 0.18 ships in Debian as ``openclipart-svg``: 8,121 public-domain SVG drawings in a
category tree (``animals/birds``, ``food/fruit``...), each with Dublin Core metadata inside the file
(``dc:title``, ``dc:subject`` keywords, ``dc:description``). The builder fetches the package once
with ``apt-get download`` + ``dpkg-deb -x`` (no root needed) into the littune cache, or reads a
folder or ``.deb`` given with ``source``.

Filtering drops what is not a picture of something: symlinked and byte-identical duplicates, the
icon themes (any ``icons`` category), the generated star shapes (``shapes/stars``), the gradient
swatches (``special/gradients``), files that reference external images, files that are not valid
XML, drawings without a title, and the few whose stated licence is not public domain. Every
dropped file is listed in ``skipped.tsv`` with its reason. Many drawings sit small on a large page,
so each is cropped to its drawn pixels (re-rendered sharper when small) and fitted in the square
with a 4% white margin.

Captions are the cleaned title ("Clipart by X - " prefixes and underscores removed), the title with
its keywords, and the description when there is one (descriptions shared by three or more files are
boilerplate and dropped). A title shared by three or more files is a collection name ("AIGA Symbol
Signs", "card"): those drawings are titled by their file name, e.g. "aiga escalator (AIGA Symbol
Signs)". Titles are noisy and partly Italian or French. The train/val/test split (80/10/10) hashes
the casefolded title (the collection name for a series) with the seed, so drawings that share a
title land in the same split and no test title is a training title. ``retrieval_test.csv`` has one
caption per test image (title and keywords), leaving out images whose caption another test image
also has, so text-to-image retrieval has one right answer.

The package in steps: :mod:`.clips` (one drawing's metadata and captions), :mod:`.scan` (finding
and filtering the drawings), :mod:`.build` (the recipe: fetch, scan, draw, split, write) and
:mod:`.card`.
"""

from .build import build_openclipart
from .clips import Clip, clean_description, clean_keywords, clean_title, parse_clip
from .scan import DEB_PACKAGE, fetch_source, find_svg_root, scan, stem_words

__all__ = ["DEB_PACKAGE", "Clip", "build_openclipart", "clean_description", "clean_keywords", "clean_title",
           "fetch_source", "find_svg_root", "parse_clip", "scan", "stem_words"]
