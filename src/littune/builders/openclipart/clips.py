"""One Openclipart drawing: its Dublin Core metadata, cleaned into captions.

Each SVG of Openclipart 0.18 carries its metadata inside the file (``dc:title``, ``dc:subject``
keywords, ``dc:description``, the creator and the licence). :func:`parse_clip` reads them, cleans
them ("Clipart by X - " prefixes, underscores, tool noise and the author's name in the keywords,
descriptions that are only an e-mail address or a link) and says why a drawing is unusable: not valid XML, an external image reference, no
title, or a licence that is not public domain. A clip's captions are the cleaned title, the title
with its keywords, and the description when there is one.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
    "svg": "http://www.w3.org/2000/svg",
    "xlink": "http://www.w3.org/1999/xlink",
}
_CC_NEW = "http://creativecommons.org/ns#"
_PD_MARKERS = ("publicdomain", "zero/1.0")
_NOISE_KEYWORDS = {"", "hash", "unsorted", "magick", "none", "clip art", "clipart", "image", "svg", "media"}


@dataclass
class Clip:
    """One Openclipart drawing and its cleaned metadata."""

    id: str
    path: Path
    category: str
    title: str = ""
    series: str = ""
    keywords: list[str] = field(default_factory=list)
    description: str = ""
    license: str = ""
    creator: str = ""
    has_text: bool = False

    def captions(self) -> list[str]:
        """Caption variants: title, title with keywords, description (duplicates removed)."""
        caps = [self.title]
        if self.keywords:
            caps.append(f"{self.title}, {', '.join(self.keywords)}")
        if self.description:
            caps.append(self.description)
        seen, out = set(), []
        for c in caps:
            if c and c.casefold() not in seen:
                seen.add(c.casefold())
                out.append(c)
        return out

    @property
    def retrieval_caption(self) -> str:
        return f"{self.title}, {', '.join(self.keywords)}" if self.keywords else self.title


def _text(el) -> str:
    return " ".join((el.text or "").split()) if el is not None else ""


def clean_title(title: str) -> str:
    """Strip ``Clipart by NAME - `` prefixes, underscores and extra spaces."""
    title = " ".join(title.replace("_", " ").split())
    title = re.sub(r"^clip\s*art\s+by\s+[^-]+?\s+-\s+", "", title, flags=re.I)
    return title.strip(" -")


def clean_keywords(words: Sequence[str], title: str, creator: str = "") -> list[str]:
    """Readable keywords, without tool noise (``hash``, hex ids), the title or the author's name."""
    out = []
    creator = " ".join(creator.lower().split())
    for w in words:
        w = " ".join(w.replace("_", " ").split()).strip(" ,;")
        low = w.lower()
        if low in _NOISE_KEYWORDS or re.fullmatch(r"0x[0-9a-f]+|\d+", low) or low == title.lower():
            continue
        if creator and (low == creator or (len(low) > 5 and (low in creator or creator in low))):
            continue
        if low not in (o.lower() for o in out):
            out.append(w)
    return out


def clean_description(text: str, title: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    if not text or text.lower() == title.lower() or re.fullmatch(r"\S+@\S+|(https?://|www\.)\S+", text):
        return ""
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + "..."
    return text


def parse_clip(path: Path, root: Path) -> tuple[Clip, str | None]:
    """Read one SVG's metadata; returns the clip and a skip reason (None when usable)."""
    rel = path.relative_to(root)
    category = rel.parent.as_posix() if rel.parent != Path(".") else ""
    cid = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.with_suffix("").as_posix().replace("/", "__"))
    clip = Clip(id=cid, path=path, category=category)
    try:
        data = path.read_bytes()
        tree = ET.fromstring(data)
    except ET.ParseError as e:
        return clip, f"not valid XML ({e})"
    except OSError as e:
        return clip, f"unreadable ({e.strerror or e})"
    work = tree.find(".//cc:Work", NS)
    if work is None:
        work = tree.find(f".//{{{_CC_NEW}}}Work")
    if work is not None:
        title = _text(work.find("dc:title", NS))
        desc = _text(work.find("dc:description", NS))
        words = [_text(li) for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS)]
        creator = work.find("dc:creator/cc:Agent/dc:title", NS)
        clip.creator = _text(creator)
        lic = work.find("cc:license", NS)
        if lic is None:
            lic = work.find(f"{{{_CC_NEW}}}license")
        clip.license = (lic.get(f"{{{NS['rdf']}}}resource", "") if lic is not None else "")
    else:
        title = _text(tree.find("svg:title", NS))
        desc, words = "", []
    clip.title = clean_title(title)
    clip.keywords = clean_keywords(words, clip.title, clip.creator)
    clip.description = clean_description(desc, clip.title)
    clip.has_text = tree.find(".//svg:text", NS) is not None
    for el in tree.iter(f"{{{NS['svg']}}}image"):
        href = el.get(f"{{{NS['xlink']}}}href") or el.get("href") or ""
        if not href.strip().startswith("data:"):
            return clip, f"references an external image ({href[:80] or 'empty href'})"
    if not clip.title:
        return clip, "no title"
    if clip.license and not any(m in clip.license.lower() for m in _PD_MARKERS):
        return clip, f"licence is not public domain ({clip.license})"
    return clip, None

