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

The package in steps: :mod:`.designs` (the icon sets and their families), :mod:`.concepts`
(emojibase concepts and captions), :mod:`.iconify` (icon set -> SVG), :mod:`.matching` (icons ->
concepts), :mod:`.build` (the recipe: fetch, match, draw, split, write) and :mod:`.card`.
"""

from .build import build_emoji
from .concepts import (EMOJIBASE, EMOJIBASE_VERSION, Concept, caption_variants, display_name,
                       emojibase_languages, hex_key, load_concepts, slugify, with_article)
from .designs import DEFAULT_HELDOUT, DESIGNS, FAMILIES, REFERENCE_DESIGNS, Design, resolve_designs, resolve_heldout
from .iconify import IconSet
from .matching import NameIndex, match_icons

__all__ = ["DEFAULT_HELDOUT", "DESIGNS", "EMOJIBASE", "EMOJIBASE_VERSION", "FAMILIES", "REFERENCE_DESIGNS",
           "Concept", "Design", "IconSet", "NameIndex", "build_emoji", "caption_variants", "display_name",
           "emojibase_languages", "hex_key", "load_concepts", "match_icons", "resolve_designs", "resolve_heldout",
           "slugify", "with_article"]
