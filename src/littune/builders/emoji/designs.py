"""The emoji designs: which npm icon set draws each, and which design family it belongs to.

Packages that hold the same or derived art count as one family (Noto and Noto v1; EmojiOne v1 and
v2; Fluent flat, 3D and high contrast), so holding out a design holds out its whole family
(:func:`resolve_heldout`). Twemoji and OpenMoji are held out by default; their ``chars.json``
(code point -> icon name), with those of the other selected code-point sets, is what the
name-only sets are matched against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ...errors import LittuneError


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
