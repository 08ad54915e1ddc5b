"""Evaluation sets: labelled images for zero-shot classification, captioned images for retrieval.

**Labelled images** (:func:`open_labeled`) come in two layouts:

* a class folder ``root/<class>/*.png`` (images found recursively under each class folder, in
  sorted order: ``root/cat/2019/x.png`` is a ``cat``, see :func:`key_classes`). Classes are the class
  folders holding at least one image, in sorted (code point) order. Display names -- what goes into the prompts -- are the folder names with ``_`` read as a
  space, unless a ``classnames.txt`` (in ``root``, or given) lists one name per line in folder order.
  Images directly in ``root`` belong to no class and are listed in ``problems``.
* a CSV/TSV with an image column and a label column (``image,label``; common column names are
  recognised, or name them). Labels are class names; with a class-names file they may also be
  0-based indices into it, and the file fixes the class order. Without one, the classes are the
  distinct labels, sorted. Relative image paths are relative to the CSV file (or ``image_root``).

**Retrieval sets** (:func:`open_retrieval`) are any captioned source :func:`littune.data.sources.open_source`
reads -- typically a CSV ``image,caption`` with several rows per image -- flattened into a caption
list and ``text_to_image``.

Both keep the :class:`~littune.data.records.Record` of each image and its ``key`` (the relative
path for a folder, the image cell for a CSV), which is how :func:`littune.inference.embeddings.image_embeddings`
finds an image in an embedding cache written by ``littune embed`` over the same folder or file.

:func:`folder_labels` gives the classes of image keys laid out ``<class>/.../<image>`` under a root (an
embedding cache of a class folder, the emoji evaluation splits): the same rule (:func:`key_classes`) as
a class folder's, so evaluation and validation during training label an image alike.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import LittuneError

LABEL_COLUMNS = ("label", "labels", "class", "classname", "class_name", "category", "target", "y")
CLASSNAMES_FILE = "classnames.txt"


@dataclass
class LabeledImages:
    """Images with one class each. ``labels[i]`` indexes ``classnames`` for ``records[i]``."""

    records: list[Any]
    labels: list[int]
    classnames: list[str]
    description: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    #: the :class:`~littune.data.base.Source` the images were read from (its fingerprint checks a cache)
    source: Any = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]


@dataclass
class RetrievalSet:
    """Images and their captions: ``texts[t]`` describes ``records[text_to_image[t]]``."""

    records: list[Any]
    texts: list[str]
    text_to_image: list[int]
    description: str
    problems: list[tuple[str, str]] = field(default_factory=list)
    #: the :class:`~littune.data.base.Source` the images were read from (its fingerprint checks a cache)
    source: Any = None

    def __len__(self) -> int:
        return len(self.records)


def read_classnames(path: str | Path) -> list[str]:
    """One class name per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise LittuneError(f"class-names file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise LittuneError(f"class-names file {path} is not UTF-8 text ({e.reason})") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise LittuneError(f"class-names file {path} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LittuneError(f"class-names file {path} repeats {dup[0]!r}")
    return names


def class_folder(root: str | Path, classnames: str | Path | None = None) -> LabeledImages:
    """Labelled images from ``root/<class>/...`` (see the module docstring)."""
    from ..data.sources import FolderSource

    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise LittuneError(f"dataset folder not found: {root}")
    source = FolderSource(root)
    found = source.records()
    records, folders, problems = [], [], list(source.problems)
    for rec, folder in zip(found, key_classes([r.key for r in found])):
        if folder is None:
            problems.append((rec.path or rec.key, "image outside a class folder (ignored)"))
            continue
        records.append(rec)
        folders.append(folder)
    classes = sorted(set(folders))
    if not classes:
        raise LittuneError(f"{root} has no class folders with images (expected {root}/<class>/<image>)")
    if classnames is None and (root / CLASSNAMES_FILE).is_file():
        classnames = root / CLASSNAMES_FILE
    if classnames is not None:
        names = read_classnames(classnames)
        if len(names) != len(classes):
            shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
            raise LittuneError(f"{classnames} has {len(names)} class names but {root} has {len(classes)} "
                               f"class folders with images ({shown})")
    else:
        names = [c.replace("_", " ") for c in classes]
    index = {c: k for k, c in enumerate(classes)}
    return LabeledImages(records, [index[f] for f in folders], names, f"class folder {root}", problems, source)


def _csv_header(path: Path, delimiter: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f, delimiter=delimiter), [])
    except FileNotFoundError:
        raise LittuneError(f"dataset file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise LittuneError(f"{path} is not UTF-8 text ({e.reason})") from None


def _label_column(path: Path, header: list[str], label_column: str | None) -> str:
    """The named label column, or the first header that is a common label column name."""
    if label_column is None:
        lower = {h.strip().lower(): h for h in header}
        label_column = next((lower[c] for c in LABEL_COLUMNS if c in lower), None)
        if label_column is None:
            raise LittuneError(f"{path}: cannot tell which column holds the label; the columns are {header} "
                               "(name it with --label-column)")
    elif label_column not in header:
        raise LittuneError(f"{path}: no label column {label_column!r}; the columns are {header}")
    return label_column


def _labelled_records(path: Path, source) -> tuple[list[Any], list[str], list[tuple[str, str]]]:
    """``(records, raw label of each, problems)``: rows without a label are problems, two labels an error."""
    found = source.records()
    problems = list(source.problems)  # filled while reading the records
    records, raw = [], []
    for rec in found:
        if not rec.captions:
            problems.append((rec.path or rec.key, "no label (ignored)"))
            continue
        if len(rec.captions) > 1:
            raise LittuneError(f"{path}: image {rec.key!r} has {len(rec.captions)} labels "
                               f"({', '.join(repr(c) for c in rec.captions[:3])}); a zero-shot set needs one")
        records.append(rec)
        raw.append(rec.captions[0])
    if not records:
        raise LittuneError(f"{path} lists no labelled image")
    return records, raw, problems


def _label_indices(path: Path, records: list[Any], raw: list[str],
                   classnames: str | Path | None) -> tuple[list[str], list[int]]:
    """``(class names, label index of each record)`` from raw labels: names or indices into a class-names
    file when one is given, else the distinct names, sorted."""
    if classnames is None:
        distinct = sorted(set(raw))
        if all(v.lstrip("-").isdigit() for v in distinct):
            raise LittuneError(f"{path}: the labels are numbers; give the class names in a file "
                               "(--classnames FILE, one name per line in index order)")
        by_name = {n: k for k, n in enumerate(distinct)}
        return distinct, [by_name[v] for v in raw]
    names = read_classnames(classnames)
    by_name = {n: k for k, n in enumerate(names)}
    labels = []
    for rec, value in zip(records, raw):
        if value in by_name:
            labels.append(by_name[value])
        elif value.lstrip("-").isdigit() and 0 <= int(value) < len(names):
            labels.append(int(value))
        else:
            raise LittuneError(f"{path}: label {value!r} of image {rec.key!r} is neither a name in "
                               f"{classnames} nor an index below {len(names)}")
    return names, labels


def label_csv(path: str | Path, classnames: str | Path | None = None, image_column: str | None = None,
              label_column: str | None = None, image_root: str | None = None) -> LabeledImages:
    """Labelled images from a CSV/TSV with an image and a label column (see the module docstring)."""
    from ..data.sources import CSVSource

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise LittuneError(f"dataset file not found: {path}")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    header = _csv_header(path, delimiter)
    if not header:
        raise LittuneError(f"{path} is empty (expected a header row such as 'image,label')")
    opts: dict[str, Any] = {"caption_column": _label_column(path, header, label_column)}
    if image_column:
        opts["image_column"] = image_column
    if image_root:
        opts["image_root"] = image_root
    source = CSVSource(str(path), **opts)
    records, raw, problems = _labelled_records(path, source)
    names, labels = _label_indices(path, records, raw, classnames)
    return LabeledImages(records, labels, names, f"{path}", problems, source)


def open_labeled(path: str | Path, classnames: str | Path | None = None, **csv_options: Any) -> LabeledImages:
    """A class folder (a directory) or a label CSV/TSV (a file)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        if any(v for v in csv_options.values()):
            raise LittuneError(f"{p} is a class folder: column options apply to a CSV only")
        return class_folder(p, classnames)
    if p.is_file():
        if p.suffix.lower() not in (".csv", ".tsv", ".tab"):
            raise LittuneError(f"{p}: a zero-shot set is a class folder or a .csv/.tsv with image and label columns")
        return label_csv(p, classnames, **csv_options)
    raise LittuneError(f"dataset not found: {p}")


def open_retrieval(spec: str | Path | dict, **options: Any) -> RetrievalSet:
    """Captioned images from any source ``open_source`` reads (CSV ``image,caption``, JSONL, COCO...)."""
    from ..data.sources import open_source

    source = open_source(spec, **{k: v for k, v in options.items() if v is not None})
    records = source.records()
    texts, owner = [], []
    for i, rec in enumerate(records):
        for c in rec.captions:
            texts.append(c)
            owner.append(i)
    if not records:
        raise LittuneError(f"{source.describe()} holds no images")
    if not texts:
        raise LittuneError(f"{source.describe()} holds no captions; retrieval needs image,caption pairs")
    return RetrievalSet(list(records), texts, owner, source.describe(), list(source.problems), source)


def key_classes(keys: Sequence[str]) -> list[str | None]:
    """The class of each image key: the one rule of every zero-shot set (``littune eval zeroshot``'s class
    folders, validation during training, the benchmark). It is the top-level folder under the root, as
    torchvision's ImageFolder has it: ``cat/2019/x.png`` is a ``cat``. The root is the deepest folder that
    holds every key and still leaves each of them in a folder below it: the class folder itself for a
    class-folder source (keys relative to it); ``val/`` for keys ``val/<class>/<image>`` written relative to
    a CSV beside the split folder (so a set of one class nests its images one level deeper). A key in no
    folder under the root has no class (None)."""
    parts = [k.split("/") for k in keys]
    depth = 0
    while parts and all(len(p) > depth + 2 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return [p[depth] if len(p) > depth + 1 else None for p in parts]


def folder_labels(keys: Sequence[str], classnames_file: str | Path | None = None) -> tuple[list[str], list[int]]:
    """``(class names, label of each key)``: a key's class is given by :func:`key_classes`, classes in sorted
    folder order; display names are the folder names with ``_`` read as a space (as :func:`class_folder`
    reads them), or the lines of ``classnames_file`` (one per line, that order) when given."""
    folders = key_classes(keys)
    if None in folders:
        raise LittuneError(f"image {keys[folders.index(None)]!r} is in no class folder (expected "
                           "<class>/<image> under the set's root)")
    classes = sorted(set(folders))
    index = {c: k for k, c in enumerate(classes)}
    names = [c.replace("_", " ") for c in classes]
    if classnames_file:
        names = [ln.strip() for ln in Path(classnames_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(classes):
            raise LittuneError(f"{classnames_file} has {len(names)} names for {len(classes)} class folders")
    return names, [index[f] for f in folders]
