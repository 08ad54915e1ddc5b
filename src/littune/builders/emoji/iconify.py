"""Iconify JSON icon sets (the npm ``@iconify-json/*`` packages) as standalone SVG documents.

A set is an ``icons.json`` (icon bodies, aliases, default geometry), an optional ``chars.json``
(code point -> icon name) and an ``info.json`` (licence, author). :meth:`IconSet.svg` resolves an
icon or alias with Iconify's semantics (aliases merge geometry and add flips and rotations) and
wraps its body in an ``<svg>`` with the icon's view box.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import LittuneError
from ..fetch import read_package_json


class IconSet:
    """An Iconify JSON icon set (``icons.json``, optional ``chars.json`` and ``info.json``)."""

    def __init__(self, pkg_dir: str | Path):
        self.dir = Path(pkg_dir)
        data = read_package_json(self.dir / "icons.json")
        if not isinstance(data, dict) or not isinstance(data.get("icons"), dict):
            raise LittuneError(f"{self.dir / 'icons.json'}: not an Iconify icon set (no 'icons' object)")
        self.prefix = data.get("prefix", self.dir.name)
        self.icons: dict[str, dict] = data["icons"]
        self.aliases: dict[str, dict] = data.get("aliases") or {}
        self.defaults = {k: data[k] for k in ("left", "top", "width", "height", "rotate", "hFlip", "vFlip")
                         if k in data}
        chars_path = self.dir / "chars.json"
        self.chars: dict[str, str] = read_package_json(chars_path) if chars_path.is_file() else {}
        info_path = self.dir / "info.json"
        self.info: dict = read_package_json(info_path) if info_path.is_file() else data.get("info", {})

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
