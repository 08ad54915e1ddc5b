"""The multi-design emoji dataset: one concept, many independent drawings of it.

An emoji concept ("red apple", U+1F34E) is drawn by many design families: Google Noto, Twemoji,
OpenMoji, Microsoft Fluent, EmojiOne, Firefox OS, Streamline. The vector art comes from the npm
``@iconify-json/*`` icon sets and the names, tags and translations from ``emojibase-data``, all
fetched once with ``npm pack`` into the littune cache. Each (concept, design) pair is rendered with
resvg (cairosvg as fallback) to a 224 px RGB PNG on white.

Icons are matched to concepts by code point where a set ships ``chars.json`` (Twemoji, OpenMoji,
Noto, Fluent flat and high contrast); the other sets are matched by icon name: the names the
code-point sets use, the CLDR label, the Unicode name and the usual shortcodes, then looser forms
(``flag-for-x``, names without separators, numbered variants ``-1``). Skin-tone variants and icons
that match no concept are listed in ``skipped.tsv``.

The splits test zero-shot transfer honestly. *Held-out design families* (default Twemoji and
OpenMoji) are never trained on; packages that hold the same or derived art count as one family
(Noto and Noto v1; EmojiOne v1 and v2; Fluent flat, 3D and high contrast), so holding out a design
holds out its whole family. *Held-out concepts* (10% of the concepts, stratified by emoji group,
by a seeded hash) are never trained on in any design, and a training caption that equals one of
their captions is dropped. ``val.csv`` holds 5% of the remaining (design, concept) images of the
training designs: in-distribution validation while training.

Captions per concept: the CLDR name ("red apple"), with an article ("a red apple"), "red apple
emoji", and the tags joined ("apple, diet, food, ...", only where that string names one concept),
plus the name and tags in each language of ``langs`` (emojibase has about 30).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import LittuneError
from . import common

EMOJIBASE = "emojibase-data"
EMOJIBASE_VERSION = "17.0.0"


@dataclass(frozen=True)
class Design:
    """One emoji design: an iconify icon set on npm, and the design family it belongs to."""

    name: str
    package: str
    version: str
    family: str
    title: str
    default: bool = True
    chars_from: str | None = None  # a design with the same icon names whose chars.json applies

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


DESIGNS: dict[str, Design] = {d.name: d for d in [
    Design("noto", "@iconify-json/noto", "1.2.9", "noto", "Google Noto Color Emoji"),
    Design("noto-v1", "@iconify-json/noto-v1", "1.2.5", "noto", "Google Noto Emoji v1 (blob era)"),
    Design("twemoji", "@iconify-json/twemoji", "1.2.5", "twemoji", "Twemoji (Twitter / X)"),
    Design("openmoji", "@iconify-json/openmoji", "1.2.29", "openmoji", "OpenMoji (outlined)"),
    Design("fluent-flat", "@iconify-json/fluent-emoji-flat", "1.2.6", "fluent", "Microsoft Fluent Emoji, flat"),
    Design("fluent-high-contrast", "@iconify-json/fluent-emoji-high-contrast", "1.2.6", "fluent",
           "Microsoft Fluent Emoji, high contrast (monochrome)"),
    Design("fluent-3d", "@iconify-json/fluent-emoji", "1.2.7", "fluent",
           "Microsoft Fluent Emoji, colour (3D look; 99 MB unpacked, slow to draw)", default=False,
           chars_from="fluent-flat"),
    Design("emojione", "@iconify-json/emojione", "1.2.3", "emojione", "EmojiOne v2"),
    Design("emojione-v1", "@iconify-json/emojione-v1", "1.2.3", "emojione", "EmojiOne v1"),
    Design("fxemoji", "@iconify-json/fxemoji", "1.2.2", "fxemoji", "Firefox OS emoji (FxEmoji)"),
    Design("streamline", "@iconify-json/streamline-emojis", "1.2.4", "streamline", "Streamline emojis"),
]}
FAMILIES: dict[str, list[str]] = {}
for _d in DESIGNS.values():
    FAMILIES.setdefault(_d.family, []).append(_d.name)
DEFAULT_HELDOUT = ("twemoji", "openmoji")
# Sets whose chars.json give icon names for code points: used to match the sets that have none.
REFERENCE_DESIGNS = ("twemoji", "openmoji")


# -- concepts ---------------------------------------------------------------------------------------
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


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LittuneError(f"{path}: missing") from None
    except ValueError as e:
        raise LittuneError(f"{path}: not valid JSON ({e})") from None


def emojibase_languages(emojibase_dir: Path) -> list[str]:
    """Locales present in an unpacked emojibase-data package."""
    return sorted(p.name for p in Path(emojibase_dir).iterdir() if (p / "data.json").is_file())


def load_concepts(emojibase_dir: str | Path, langs: Sequence[str] = ()) -> list[Concept]:
    """Read emojibase's English data (and ``langs``) into concepts, in emoji order.

    Regional indicator letters and the ``component`` group (skin-tone and hair modifiers) are not
    concepts. Ids are slugs of the English label, unique (colliding slugs get the code points added).
    """
    root = Path(emojibase_dir)
    data = _read_json(root / "en" / "data.json")
    if not isinstance(data, list):
        raise LittuneError(f"{root / 'en' / 'data.json'}: expected a list of emoji records")
    meta = _read_json(root / "meta" / "groups.json") if (root / "meta" / "groups.json").is_file() else {}
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
        for r in _read_json(root / lang / "data.json"):
            c = by_key.get(hex_key(r.get("hexcode", ""))) if isinstance(r, dict) else None
            if c is not None and r.get("label"):
                c.translations[lang] = (r["label"], [t for t in r.get("tags", []) if isinstance(t, str)])
    return concepts


def caption_variants(concepts: Sequence[Concept], langs: Sequence[str] = ()) -> dict[str, list[str]]:
    """Captions per concept id, English first, then each of ``langs``; duplicates removed.

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
        caps = [c.name, with_article(c.name), f"{c.name} emoji"]
        if c.id in en_tags and en_tags[c.id].lower() != c.name.lower():
            caps.append(en_tags[c.id])
        for lang in langs:
            if lang in c.translations:
                caps.append(display_name(c.translations[lang][0]))
                if c.id in lang_tags[lang]:
                    caps.append(lang_tags[lang][c.id])
        seen, uniq = set(), []
        for cap in caps:
            if cap and cap not in seen:
                seen.add(cap)
                uniq.append(cap)
        out[c.id] = uniq
    return out


# -- iconify icon sets ------------------------------------------------------------------------------
class IconSet:
    """An Iconify JSON icon set (``icons.json``, optional ``chars.json`` and ``info.json``)."""

    def __init__(self, pkg_dir: str | Path):
        self.dir = Path(pkg_dir)
        data = _read_json(self.dir / "icons.json")
        if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
            raise LittuneError(f"{self.dir / 'icons.json'}: not an Iconify icon set (no 'icons' object)")
        self.prefix = data.get("prefix", self.dir.name)
        self.icons: dict[str, dict] = data["icons"]
        self.aliases: dict[str, dict] = data.get("aliases") or {}
        self.defaults = {k: data[k] for k in ("left", "top", "width", "height", "rotate", "hFlip", "vFlip")
                         if k in data}
        chars_path = self.dir / "chars.json"
        self.chars: dict[str, str] = _read_json(chars_path) if chars_path.is_file() else {}
        info_path = self.dir / "info.json"
        self.info: dict = _read_json(info_path) if info_path.is_file() else data.get("info", {})

    @property
    def license(self) -> str:
        lic = self.info.get("license") or {}
        return lic.get("spdx") or lic.get("title") or "unknown"

    @property
    def author(self) -> str:
        return (self.info.get("author") or {}).get("name", "unknown")

    def names(self) -> list[str]:
        return sorted(set(self.icons) | set(self.aliases))

    def resolve(self, name: str) -> dict | None:
        """The icon's body and geometry with alias transformations merged (Iconify semantics)."""
        props: dict = {}
        hflip = vflip = False
        rotate = 0
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            alias = self.aliases[name]
            for k in ("left", "top", "width", "height"):
                if k in alias and k not in props:
                    props[k] = alias[k]
            hflip ^= bool(alias.get("hFlip"))
            vflip ^= bool(alias.get("vFlip"))
            rotate += int(alias.get("rotate", 0))
            name = alias.get("parent", "")
        icon = self.icons.get(name)
        if icon is None or not isinstance(icon.get("body"), str):
            return None
        for k in ("left", "top", "width", "height"):
            props.setdefault(k, icon.get(k, self.defaults.get(k, 0 if k in ("left", "top") else 16)))
        hflip ^= bool(icon.get("hFlip", self.defaults.get("hFlip")))
        vflip ^= bool(icon.get("vFlip", self.defaults.get("vFlip")))
        rotate += int(icon.get("rotate", self.defaults.get("rotate", 0)))
        props.update(body=icon["body"], hFlip=hflip, vFlip=vflip, rotate=rotate % 4)
        return props

    def svg(self, name: str) -> str | None:
        """A standalone SVG document for icon ``name`` (None if the set has no such icon)."""
        p = self.resolve(name)
        if p is None:
            return None
        left, top, width, height = (float(p[k]) for k in ("left", "top", "width", "height"))
        body = p["body"]
        transforms = []
        rotation = p["rotate"]
        if p["hFlip"]:
            if p["vFlip"]:
                rotation += 2
            else:
                transforms.append(f"translate({_n(width + left)} {_n(-top)}) scale(-1 1)")
                left = top = 0.0
        elif p["vFlip"]:
            transforms.append(f"translate({_n(-left)} {_n(height + top)}) scale(1 -1)")
            left = top = 0.0
        rotation %= 4
        if rotation == 1:
            c = height / 2 + top
            transforms.insert(0, f"rotate(90 {_n(c)} {_n(c)})")
        elif rotation == 2:
            transforms.insert(0, f"rotate(180 {_n(width / 2 + left)} {_n(height / 2 + top)})")
        elif rotation == 3:
            c = width / 2 + left
            transforms.insert(0, f"rotate(-90 {_n(c)} {_n(c)})")
        if rotation % 2 == 1:
            left, top = top, left
            width, height = height, width
        if transforms:
            body = f'<g transform="{" ".join(transforms)}">{body}</g>'
        return ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
                f'viewBox="{_n(left)} {_n(top)} {_n(width)} {_n(height)}" '
                f'width="{_n(width)}" height="{_n(height)}">{body}</svg>')


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# -- matching icons to concepts ---------------------------------------------------------------------
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
                for cp, names in _read_json(path).items():
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


# -- the build --------------------------------------------------------------------------------------
def resolve_designs(designs: Iterable[str] | None) -> list[str]:
    """Design names from a user list of design or family names (``all``; None = the defaults)."""
    if designs is None:
        return [d.name for d in DESIGNS.values() if d.default]
    out: list[str] = []
    for item in designs:
        item = item.strip()
        if not item:
            continue
        if item == "all":
            names = list(DESIGNS)
        elif item in DESIGNS:
            names = [item]
        elif item in FAMILIES:
            names = FAMILIES[item]
        else:
            raise LittuneError(f"--designs: unknown design {item!r}; designs: {', '.join(DESIGNS)}; "
                               f"families: {', '.join(FAMILIES)}")
        out += [n for n in names if n not in out]
    if not out:
        raise LittuneError("--designs: no design selected")
    return out


def resolve_heldout(heldout: Iterable[str] | None, selected: Sequence[str]) -> list[str]:
    """Held-out family names (a design name stands for its whole family)."""
    if heldout is None:
        fams = [f for f in DEFAULT_HELDOUT if any(DESIGNS[d].family == f for d in selected)]
    else:
        fams = []
        for item in heldout:
            item = item.strip()
            if not item or item == "none":
                continue
            if item in DESIGNS:
                fam = DESIGNS[item].family
            elif item in FAMILIES:
                fam = item
            else:
                raise LittuneError(f"--heldout-designs: unknown design or family {item!r}; "
                                   f"families: {', '.join(FAMILIES)}")
            if not any(DESIGNS[d].family == fam for d in selected):
                raise LittuneError(f"--heldout-designs: family {fam!r} has no selected design "
                                   f"(selected: {', '.join(selected)})")
            if fam not in fams:
                fams.append(fam)
    if all(DESIGNS[d].family in fams for d in selected):
        raise LittuneError(f"--heldout-designs: holding out {', '.join(fams)} leaves no design to train on; "
                           f"select more --designs")
    return fams


def build_emoji(out: str | Path, *, designs: Iterable[str] | None = None,
                heldout_designs: Iterable[str] | None = None, heldout_concepts: float = 0.1,
                val_fraction: float = 0.05, limit_concepts: int | None = None, langs: Sequence[str] = (),
                size: int = 224, seed: int = 0, formats: Sequence[str] = ("csv",), workers: int | None = None,
                packages: str | Path | None = None, cache: str | Path | None = None,
                shard_size: int = 1000, log=None) -> dict:
    """Build the emoji dataset in ``out`` and return its manifest (also written to manifest.json).

    ``designs``: design or family names (default: all but ``fluent-3d``); ``heldout_designs``:
    families never trained on (default twemoji, openmoji; ``["none"]`` for none);
    ``heldout_concepts``: fraction of concepts never trained on; ``val_fraction``: share of the
    training images kept for ``val.csv``; ``limit_concepts``: build a quick subset; ``langs``:
    emojibase locales for extra captions; ``formats``: ``csv`` and/or ``wds``; ``packages``: an
    existing ``node_modules`` folder instead of fetching. Idempotent: images already rendered at
    this size are reused.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    if size < 8:
        raise LittuneError(f"--size {size}: too small")
    if not 0 <= heldout_concepts < 1 or not 0 <= val_fraction < 1:
        raise LittuneError("--heldout-concepts and --val-fraction must be in [0, 1)")
    if limit_concepts is not None and limit_concepts < 1:
        raise LittuneError(f"--limit-concepts {limit_concepts}: must be at least 1")
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in ("csv", "wds")]
    if bad or not formats:
        raise LittuneError(f"--format: unknown {', '.join(bad) or '(none)'}; use csv, wds or both")
    langs = [l for l in dict.fromkeys(langs) if l and l != "en"]
    selected = resolve_designs(designs)
    held_fams = resolve_heldout(heldout_designs, selected)
    out = common.prepare_out(out, "emoji")
    cache_root = common.cache_dir(cache)

    # fetch
    want = {DESIGNS[d].package: DESIGNS[d].spec for d in selected}
    helpers = list(REFERENCE_DESIGNS) + [DESIGNS[d].chars_from for d in selected if DESIGNS[d].chars_from]
    refs = [r for r in dict.fromkeys(helpers) if DESIGNS[r].package not in want]
    specs = [f"{EMOJIBASE}@{EMOJIBASE_VERSION}", *want.values()]
    if packages is None:
        specs += [DESIGNS[r].spec for r in refs]
    pkgs = common.fetch_npm(specs, cache_root, packages=packages, log=log)
    if packages is not None:
        for r in refs:
            if (p := common.find_npm_package(packages, DESIGNS[r].package)) is not None:
                pkgs[DESIGNS[r].package] = p
    eb_dir = pkgs[EMOJIBASE]

    # concepts and icons
    concepts = load_concepts(eb_dir, langs)
    if not concepts:
        raise LittuneError(f"{eb_dir}: emojibase data holds no emoji concepts")
    sets = {d: IconSet(pkgs[DESIGNS[d].package]) for d in selected}
    for d in selected:
        donor = DESIGNS[d].chars_from
        if donor and not sets[d].chars and DESIGNS[donor].package in pkgs:
            donor_set = sets.get(donor) or IconSet(pkgs[DESIGNS[donor].package])
            sets[d].chars = {cp: n for cp, n in donor_set.chars.items() if sets[d].resolve(n) is not None}
    ref_sets = [sets[d] if d in sets else IconSet(pkgs[DESIGNS[d].package])
                for d in REFERENCE_DESIGNS if d in sets or DESIGNS[d].package in pkgs]
    ref_sets += [s for d, s in sets.items() if s.chars and d not in REFERENCE_DESIGNS]
    index = NameIndex(concepts, ref_sets, eb_dir)
    skipped: list[tuple[str, str]] = []
    icon_of: dict[str, dict[str, str]] = {}
    for d in selected:
        icon_of[d], unused = match_icons(sets[d], concepts, index)
        skipped += [(f"icon {d}:{name}", why) for name, why in unused]
    have = {k for m in icon_of.values() for k in m}
    for c in concepts:
        if c.hexcode not in have:
            skipped.append((f"concept {c.id}", "no selected design draws it"))
    pool = [c for c in concepts if c.hexcode in have]
    if limit_concepts is not None and limit_concepts < len(pool):
        keep = common.pick_fraction([c.id for c in pool], limit_concepts / len(pool), seed, "limit:")
        pool = [c for c in pool if c.id in keep]
    ids = {c.id for c in pool}

    # held-out concepts, stratified by emoji group
    held_concepts: set[str] = set()
    groups = defaultdict(list)
    for c in pool:
        groups[c.group].append(c.id)
    for g in sorted(groups):
        held_concepts |= common.pick_fraction(groups[g], heldout_concepts, seed, f"heldout-concepts:{g}:")
    train_designs = [d for d in selected if DESIGNS[d].family not in held_fams]
    test_designs = [d for d in selected if DESIGNS[d].family in held_fams]

    # render
    jobs = []
    for d in selected:
        for c in pool:
            name = icon_of[d].get(c.hexcode)
            if name is not None:
                jobs.append(common.RenderJob(key=f"{d}/{c.id}", out=str(out / "images" / d / f"{c.id}.png"),
                                             svg=sets[d].svg(name)))
    log(f"emoji: {len(pool)} concepts x {len(selected)} designs = {len(jobs)} images "
        f"({sum(1 for j in jobs if Path(j.out).is_file())} on disk)")
    done, failed = common.render_all(jobs, size, out / "images" / ".render.json", workers=workers, desc="emoji")
    for key, err in sorted(failed.items()):
        skipped.append((f"image {key}", f"render failed: {err}"))
    removed = common.prune_files(out / "images", {Path(j.out) for j in jobs if j.key in done})
    if removed:
        log(f"emoji: removed {removed} stale image(s) from an earlier build")
    images = defaultdict(dict)  # design -> concept id -> relative path
    for key in done:
        d, cid = key.split("/", 1)
        images[d][cid] = f"images/{d}/{cid}.png"

    # splits
    captions = caption_variants(pool, langs)
    train_concepts = sorted(ids - held_concepts)
    train_pairs = [(d, cid) for d in train_designs for cid in train_concepts if cid in images[d]]
    val_keys = common.pick_fraction([f"{d}/{cid}" for d, cid in train_pairs], val_fraction, seed, "val:")
    val_pairs = [p for p in train_pairs if f"{p[0]}/{p[1]}" in val_keys]
    train_pairs = [p for p in train_pairs if f"{p[0]}/{p[1]}" not in val_keys]
    held_caps = {cap.casefold() for cid in held_concepts for cap in captions[cid]}
    dropped_caps = Counter()

    def rows(pairs):
        for d, cid in pairs:
            for cap in captions[cid]:
                if cap.casefold() in held_caps:
                    dropped_caps[cap] += 1
                    continue
                yield images[d][cid], cap

    n_train_rows = common.write_csv(out / "train.csv", rows(train_pairs)) if "csv" in formats else None
    n_val_rows = common.write_csv(out / "val.csv", rows(val_pairs))
    if "csv" not in formats and (out / "train.csv").exists():
        (out / "train.csv").unlink()
    for cap, n in sorted(dropped_caps.items()):
        skipped.append((f"caption {cap!r}", f"equals a held-out concept's caption; dropped from {n} training image(s)"))
    if "wds" in formats:
        def samples(pairs):
            return [(f"{d}__{cid}", out / images[d][cid],
                     {"captions": [c for c in captions[cid] if c.casefold() not in held_caps],
                      "concept": cid, "design": d}) for d, cid in pairs]
        if (out / "wds").is_dir():
            shutil.rmtree(out / "wds")
        shards = common.write_wds(out / "wds" / "train", "train", samples(train_pairs), shard_size)
        common.write_wds(out / "wds" / "val", "val", samples(val_pairs), shard_size)
    else:
        shards = []
        if (out / "wds").is_dir():
            shutil.rmtree(out / "wds")

    # evaluation folders
    eval_dir = out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    name_of = {c.id: c.name for c in pool}
    en_caps = caption_variants(pool)
    splits = {
        "heldout_designs": (test_designs, sorted(ids)),
        "heldout_concepts": (train_designs, sorted(held_concepts)),
        "heldout_both": (test_designs, sorted(held_concepts)),
    }
    eval_counts = {}
    for split, (dsgns, cids) in splits.items():
        members = [(d, cid) for cid in cids for d in dsgns if cid in images[d]]
        if not members:
            continue
        for d, cid in members:
            common.link_or_copy(out / images[d][cid], eval_dir / split / cid / f"{d}.png")
        classes = sorted({cid for _, cid in members})
        common.write_text(eval_dir / split / "classnames.txt", "".join(name_of[c] + "\n" for c in classes))
        common.write_csv(eval_dir / f"retrieval_{split}.csv",
                         ((f"{split}/{cid}/{d}.png", cap) for d, cid in sorted(members, key=lambda p: (p[1], p[0]))
                          for cap in en_caps[cid]))
        eval_counts[split] = {"images": len(members), "classes": len(classes), "designs": dsgns}

    # manifest, skipped, datacard
    per_design = {}
    for d in selected:
        per_design[d] = {
            "package": DESIGNS[d].package, "version": common.package_version(pkgs[DESIGNS[d].package]),
            "family": DESIGNS[d].family, "title": DESIGNS[d].title, "license": sets[d].license,
            "author": sets[d].author, "split": "heldout" if d in test_designs else "train",
            "matched_by": "code points (chars.json)" if sets[d].chars else "icon names",
            "images": len(images[d]),
        }
    from .render import renderer_versions

    manifest = {
        "builder": "emoji", "seed": seed, "size": size, "formats": formats, "langs": langs,
        "emojibase": {"version": common.package_version(eb_dir), "license": "MIT"},
        "designs": per_design, "train_designs": train_designs, "heldout_designs": test_designs,
        "heldout_families": held_fams, "heldout_concept_fraction": heldout_concepts, "val_fraction": val_fraction,
        "limit_concepts": limit_concepts,
        "counts": {
            "concepts": len(pool), "train_concepts": len(train_concepts), "heldout_concepts": len(held_concepts),
            "images": sum(len(v) for v in images.values()), "train_images": len(train_pairs),
            "val_images": len(val_pairs), "train_rows": n_train_rows, "val_rows": n_val_rows,
            "train_shards": len(shards), "render_failures": len(failed), "skipped": len(skipped),
            "eval": eval_counts,
        },
        "concepts": {"train": train_concepts, "heldout": sorted(held_concepts)},
        "renderers": renderer_versions(),
        "render_counts": dict(Counter(v for v in done.values())),
        "build_seconds": round(time.time() - t0, 1),
    }
    common.write_skipped(out / "skipped.tsv", skipped)
    common.write_json(out / "manifest.json", manifest)
    common.write_text(out / "datacard.md", _datacard(manifest, skipped))
    log(f"emoji: wrote {out} in {manifest['build_seconds']} s: {len(train_pairs)} train / {len(val_pairs)} val "
        f"images, {len(skipped)} skipped (see skipped.tsv)")
    return manifest


def _datacard(m: dict, skipped: list[tuple[str, str]]) -> str:
    c = m["counts"]
    reasons = Counter(re.split(r"[:;(]", r)[0].strip() for _, r in skipped)
    design_rows = [(d, v["title"], v["family"], v["split"], v["images"], v["license"],
                    f'{v["package"]}@{v["version"]}', v["matched_by"]) for d, v in m["designs"].items()]
    eval_rows = [(s, v["images"], v["classes"], ", ".join(v["designs"])) for s, v in c["eval"].items()]
    return f"""# Emoji in many designs (littune data emoji)

One image per (emoji concept, design): {c['images']} images of {c['concepts']} concepts in
{len(m['designs'])} designs, drawn from the npm Iconify icon sets and named with emojibase-data
{m['emojibase']['version']} (MIT). Rendered at {m['size']} px on white with {', '.join(f'{k} {v}' for k, v in m['renderers'].items())}.
Seed {m['seed']}. Built in {m['build_seconds']} s.

## Designs

{common.markdown_table(("design", "title", "family", "split", "images", "licence", "package", "matched by"), design_rows)}

Held-out design families (never trained on): {', '.join(m['heldout_families']) or 'none'}.
Sets that hold the same or derived art are one family, so a held-out family is held out whole.
The licences are those of each icon set: attribute CC-BY sets and share CC-BY-SA derivatives alike.

## Splits

- `train.csv`: {c['train_images']} images of {c['train_concepts']} concepts in the training designs, {c['train_rows']} rows
  (one per caption variant).
- `val.csv`: {c['val_images']} images ({m['val_fraction']:.0%} of the training designs' images of training concepts,
  by seeded hash), {c['val_rows']} rows. The concepts also appear in train.csv in other designs.
- Held-out concepts: {c['heldout_concepts']} concepts ({m['heldout_concept_fraction']:.0%} per emoji group) never
  in train or val, in any design or caption.

Evaluation folders (`eval/<split>/<concept>/<design>.png` + `classnames.txt`, and
`eval/retrieval_<split>.csv` with English captions):

{common.markdown_table(("split", "images", "classes", "designs"), eval_rows)}

## Captions

The CLDR name, with an article, with "emoji", and the tags joined (when that string names one
concept){'; plus names and tags in ' + ', '.join(m['langs']) if m['langs'] else ''}.

## Skipped ({c['skipped']}, see skipped.tsv)

{common.markdown_table(("reason", "count"), sorted(reasons.items(), key=lambda kv: -kv[1]))}
"""
