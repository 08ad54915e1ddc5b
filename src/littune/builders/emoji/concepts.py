"""Emoji concepts and their captions, from emojibase-data.

A concept is one emoji of emojibase's English data ("red apple", U+1F34E); skin-tone variants,
regional indicator letters and the ``component`` group are not concepts. Its id is the slug of its
CLDR label, its key the normalised code points (:func:`hex_key`). Captions per concept
(:func:`caption_variants`): the CLDR name ("red apple"), with an article ("a red apple"), "red
apple emoji", and the tags joined ("apple, diet, food, ...", only where that string names one
concept), plus the name and tags in each language of ``langs`` (emojibase has about 30).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...errors import LittuneError
from ..fetch import read_package_json

EMOJIBASE = "emojibase-data"
EMOJIBASE_VERSION = "17.0.0"


def hex_key(hexcode: str) -> str:
    """Normalised code point key: lower case, ``-`` separated, without the FE0F variation selector."""
    return "-".join(p for p in hexcode.lower().replace("_", "-").split("-") if p and p != "fe0f")


def slugify(text: str) -> str:
    """``"Mrs. Claus"`` -> ``"mrs-claus"``; ``"piñata"`` -> ``"pinata"``."""
    text = unicodedata.normalize("NFKD", text.replace("’", "'")).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("'", "")).strip("-")


def display_name(label: str) -> str:
    """A CLDR label made readable in a sentence: ``"flag: Japan"`` -> ``"flag of Japan"``."""
    label = label.replace("’", "'").strip()
    if label.startswith("flag: "):
        return "flag of " + label[6:]
    if label.startswith("keycap: "):
        return "keycap " + label[8:]
    return label


def with_article(name: str) -> str:
    """``"red apple"`` -> ``"a red apple"``, ``"ogre"`` -> ``"an ogre"``, flags get ``"the"``."""
    low = name.lower()
    if low.startswith("flag of "):
        return "the " + name
    vowel = low[:1] in "aeiou" and not re.match(r"(one\b|uni|use|usu|eu|ewe|u\b)", low)
    vowel = vowel or bool(re.match(r"(hour|honou?r|heir)", low))
    return ("an " if vowel else "a ") + name


@dataclass
class Concept:
    """One emoji concept from emojibase (skin-tone variants are not separate concepts)."""

    id: str
    hexcode: str
    emoji: str
    label: str
    name: str
    tags: list[str]
    group: str
    subgroup: str
    order: int
    translations: dict[str, tuple[str, list[str]]] = field(default_factory=dict)



def emojibase_languages(emojibase_dir: Path) -> list[str]:
    """Locales present in an unpacked emojibase-data package."""
    return sorted(p.name for p in Path(emojibase_dir).iterdir() if (p / "data.json").is_file())


def load_concepts(emojibase_dir: str | Path, langs: Sequence[str] = ()) -> list[Concept]:
    """Read emojibase's English data (and ``langs``) into concepts, in emoji order.

    Regional indicator letters and the ``component`` group (skin-tone and hair modifiers) are not
    concepts. Ids are slugs of the English label, unique (colliding slugs get the code points added).
    """
    root = Path(emojibase_dir)
    data = read_package_json(root / "en" / "data.json")
    if not isinstance(data, list):
        raise LittuneError(f"{root / 'en' / 'data.json'}: expected a list of emoji records")
    meta = read_package_json(root / "meta" / "groups.json") if (root / "meta" / "groups.json").is_file() else {}
    groups = {str(k): v for k, v in meta.get("groups", {}).items()}
    subgroups = {str(k): v for k, v in meta.get("subgroups", {}).items()}
    missing = [lang for lang in langs if not (root / lang / "data.json").is_file()]
    if missing:
        raise LittuneError(f"--langs: emojibase has no locale {', '.join(missing)}; "
                           f"available: {', '.join(l for l in emojibase_languages(root) if l != 'en')}")
    raw = []
    for rec in data:
        if not isinstance(rec, dict) or "hexcode" not in rec or "label" not in rec:
            continue
        group = rec.get("group")
        if group is None or groups.get(str(group)) == "component":
            continue
        raw.append(rec)
    slugs = Counter(slugify(r["label"]) for r in raw)
    concepts = []
    for r in raw:
        key = hex_key(r["hexcode"])
        slug = slugify(r["label"])
        cid = slug if slug and slugs[slug] == 1 else f"{slug}-{key}".strip("-")
        concepts.append(Concept(
            id=cid, hexcode=key, emoji=r.get("emoji", ""), label=r["label"], name=display_name(r["label"]),
            tags=[t.replace("’", "'") for t in r.get("tags", []) if isinstance(t, str)],
            group=groups.get(str(r["group"]), str(r["group"])),
            subgroup=subgroups.get(str(r.get("subgroup")), str(r.get("subgroup", ""))),
            order=int(r.get("order", 0) or 0)))
    by_key = {c.hexcode: c for c in concepts}
    for lang in langs:
        for r in read_package_json(root / lang / "data.json"):
            c = by_key.get(hex_key(r.get("hexcode", ""))) if isinstance(r, dict) else None
            if c is not None and r.get("label"):
                c.translations[lang] = (r["label"], [t for t in r.get("tags", []) if isinstance(t, str)])
    return concepts


def caption_variants(concepts: Sequence[Concept], langs: Sequence[str] = ()) -> dict[str, list[str]]:
    """Captions per concept id, English first, then each of ``langs``; duplicates removed."""
    return {cid: [text for text, _ in caps] for cid, caps in tagged_captions(concepts, langs).items()}


def tagged_captions(concepts: Sequence[Concept], langs: Sequence[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """``(caption, language)`` per concept id, English first, then each of ``langs``; a caption that
    repeats (the same words in two languages) is kept once, with its first language.

    Tags joined are used only when that string belongs to one concept (several concepts share
    "animal", which would make false negatives in a contrastive batch).
    """
    def joined_unique(get) -> dict[str, str]:
        counts = Counter(get(c) for c in concepts)
        return {c.id: get(c) for c in concepts if get(c) and counts[get(c)] == 1}

    en_tags = joined_unique(lambda c: ", ".join(c.tags))
    lang_tags = {lang: joined_unique(lambda c, l=lang: ", ".join(c.translations.get(l, ("", []))[1]))
                 for lang in langs}
    out = {}
    for c in concepts:
        caps = [(c.name, "en"), (with_article(c.name), "en"), (f"{c.name} emoji", "en")]
        if c.id in en_tags and en_tags[c.id].lower() != c.name.lower():
            caps.append((en_tags[c.id], "en"))
        for lang in langs:
            if lang in c.translations:
                caps.append((display_name(c.translations[lang][0]), lang))
                if c.id in lang_tags[lang]:
                    caps.append((lang_tags[lang][c.id], lang))
        seen, uniq = set(), []
        for cap, lang in caps:
            if cap and cap not in seen:
                seen.add(cap)
                uniq.append((cap, lang))
        out[c.id] = uniq
    return out


def class_name(concept: Concept, lang: str) -> str | None:
    """The concept's name in ``lang`` (emojibase's label; ``None`` where that locale has none)."""
    if lang == "en":
        return concept.name
    t = concept.translations.get(lang)
    return display_name(t[0]) if t else None
