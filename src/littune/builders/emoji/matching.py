"""Matching the icons of a set to emoji concepts.

Icons are matched by code point where a set ships ``chars.json`` (Twemoji, OpenMoji, Noto, Fluent
flat and high contrast); the other sets are matched by icon name (:class:`NameIndex`): the names
the code-point sets use, the CLDR label, the Unicode name and the usual shortcodes, then looser
forms (``flag-for-x``, names without separators, numbered variants ``-1``). Skin-tone variants and
icons that match no concept are returned with the reason they are unused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..fetch import read_package_json
from .concepts import Concept, hex_key, slugify
from .iconify import IconSet

_SKIN = re.compile(r"(skin-tone|-tone[1-5]\b|-(light|medium|dark|medium-light|medium-dark)$)")


def _compress(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


class NameIndex:
    """Icon name -> concept, for icon sets without ``chars.json``.

    Built from the names that code-point sets give their icons, the CLDR labels, the Unicode names
    and shortcodes. A name that points at two concepts at the same tier is ambiguous and unused.
    """

    def __init__(self, concepts: Sequence[Concept], references: Sequence[IconSet] = (),
                 emojibase_dir: Path | None = None):
        keys = {c.hexcode for c in concepts}
        t1: dict[str, set] = defaultdict(set)
        t2: dict[str, set] = defaultdict(set)
        for c in concepts:
            t1[slugify(c.label)].add(c.hexcode)
        for ref in references:
            name_to_key = {}
            for cp, name in ref.chars.items():
                k = hex_key(cp)
                if k in keys:
                    t1[name].add(k)
                    name_to_key[name] = k
            for alias, a in ref.aliases.items():
                if a.get("parent") in name_to_key and not (a.get("hFlip") or a.get("vFlip") or a.get("rotate")):
                    t1[alias].add(name_to_key[a["parent"]])
        if emojibase_dir is not None:
            root = Path(emojibase_dir)
            tables = [root / "meta" / "unicode-names.json"]
            tables += sorted((root / "en" / "shortcodes").glob("*.json")) if (root / "en" / "shortcodes").is_dir() else []
            for path in tables:
                if not path.is_file():
                    continue
                for cp, names in read_package_json(path).items():
                    k = hex_key(cp)
                    if k in keys:
                        for nm in [names] if isinstance(names, str) else names:
                            t2[slugify(nm)].add(k)
        self.tiers = [t1, t2]
        comp: dict[str, set] = defaultdict(set)
        for t in self.tiers:
            for nm, ks in t.items():
                comp[_compress(nm)] |= ks
        self.compressed = comp

    def _exact(self, name: str) -> tuple[str, int] | None:
        for tier, table in enumerate(self.tiers):
            ks = table.get(name)
            if ks and len(ks) == 1:
                return next(iter(ks)), tier
        return None

    def lookup(self, name: str) -> tuple[str, int] | None:
        """``(concept key, tier)`` for an icon name, lower tier = more certain; None if no match."""
        hit = self._exact(name)
        if hit:
            return hit
        m = re.fullmatch(r"flag-for-(?:flag-)?(.+)", name)
        if m and (hit := self._exact("flag-" + m.group(1))):
            return hit[0], 2
        ks = self.compressed.get(_compress(name))
        if ks and len(ks) == 1:
            return next(iter(ks)), 3
        m = re.fullmatch(r"(.+)-(\d+)", name)
        if m and (hit := self.lookup(m.group(1))):
            return hit[0], 4 + int(m.group(2))
        return None


def match_icons(iconset: IconSet, concepts: Sequence[Concept], index: NameIndex
                ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``({concept key: icon name}, [(icon name, why unused)])`` for one icon set."""
    keys = {c.hexcode for c in concepts}
    chosen: dict[str, tuple] = {}
    unused: list[tuple[str, str]] = []
    if iconset.chars:
        for cp, name in sorted(iconset.chars.items()):
            k = hex_key(cp)
            if k in keys and iconset.resolve(name) is not None:
                cand = (0, len(cp), name)  # prefer the shortest code point spelling (no FE0F)
                if k not in chosen or cand < chosen[k]:
                    chosen[k] = cand
        used = {v[2] for v in chosen.values()}
        for name in iconset.names():
            if name not in used:
                unused.append((name, "skin-tone variant" if _SKIN.search(name) else "no emoji concept with this code point"))
        return {k: v[2] for k, v in chosen.items()}, unused
    for name in iconset.names():
        if _SKIN.search(name):
            unused.append((name, "skin-tone variant"))
            continue
        hit = index.lookup(name)
        if hit is None:
            unused.append((name, "icon name matches no emoji concept"))
            continue
        k, tier = hit
        cand = (tier, name)
        if k in chosen:
            loser = max(cand, chosen[k])
            unused.append((loser[1], f"another icon of this set drew the same concept ({min(cand, chosen[k])[1]})"))
            if cand > chosen[k]:
                continue
        chosen[k] = cand
    return {k: v[1] for k, v in chosen.items()}, unused
