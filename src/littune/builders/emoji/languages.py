"""Per-language evaluation files of the emoji set: the same held-out images, named and captioned in
each emojibase locale.

For a split ``S`` and a language ``L`` other than English, beside the English files that
:func:`littune.builders.emoji.build.write_eval` writes:

* ``eval/S/classnames.L.txt`` -- the class names in ``L`` (emojibase's labels), line for line in the
  order of ``eval/S/classnames.txt``; a concept the locale does not name keeps its English name, and
  the count of those is returned (and kept in the manifest), so a score can be read with it;
* ``eval/retrieval_S.L.csv`` -- every image of the split with each of its concept's captions in ``L``
  (the name and, where unique, the tags): the text->image retrieval table of that language.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...errors import LittuneError
from ...fileio import atomic_write
from ..output import write_csv
from .concepts import Concept, class_name, tagged_captions


def language_files(eval_dir: Path, split: str, lang: str) -> tuple[Path, Path]:
    """``(classnames, retrieval table)`` of one split in one language (English: the plain files)."""
    if lang == "en":
        return eval_dir / split / "classnames.txt", eval_dir / f"retrieval_{split}.csv"
    return eval_dir / split / f"classnames.{lang}.txt", eval_dir / f"retrieval_{split}.{lang}.csv"


def write_language_eval(out: Path, split: str, pool: Sequence[Concept], langs: Sequence[str]) -> dict:
    """Write the split's class names and retrieval table in every language of ``langs`` (English
    is the plain files already written); returns ``{lang: {"english_names": n, "captions": n}}``."""
    eval_dir = out / "eval"
    by_id = {c.id: c for c in pool}
    classes = (eval_dir / split / "classnames.txt").read_text(encoding="utf-8").splitlines()
    folders = sorted(p.name for p in (eval_dir / split).iterdir() if p.is_dir())
    if len(folders) != len(classes):
        raise LittuneError(f"{eval_dir / split}: {len(folders)} class folders but {len(classes)} class names")
    members = [(cid, png.name) for cid in folders for png in sorted((eval_dir / split / cid).glob("*.png"))]
    counts = {}
    for lang in langs:
        if lang == "en":
            continue
        names, fallback = [], 0
        for cid, english in zip(folders, classes):
            name = class_name(by_id[cid], lang)
            fallback += name is None
            names.append(name or english)
        names_file, table = language_files(eval_dir, split, lang)
        atomic_write(names_file, "".join(n + "\n" for n in names))
        tagged = tagged_captions(pool, [lang])
        caps = {cid: [t for t, tl in tagged[cid] if tl == lang] for cid in folders}
        n = write_csv(table, ((f"{split}/{cid}/{png}", cap) for cid, png in members for cap in caps[cid]))
        counts[lang] = {"english_names": fallback, "captions": n}
    return counts
