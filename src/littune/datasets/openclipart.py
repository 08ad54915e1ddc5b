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
Signs)". Titles are noisy and partly Italian or French. The train/val/test split (80/10/10) hashes the casefolded title (the collection name for a
series) with the seed, so drawings that share a title land in the same split and a test caption is never a training
caption. ``retrieval_test.csv`` has one caption per test image (title and keywords), leaving out
images whose caption another test image also has, so text-to-image retrieval has one right answer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import LittuneError
from . import common

DEB_PACKAGE = "openclipart-svg"
SVG_ROOT = Path("usr/share/openclipart/svg")
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
    "svg": "http://www.w3.org/2000/svg",
    "xlink": "http://www.w3.org/1999/xlink",
}
_CC_NEW = "http://creativecommons.org/ns#"
DROP_CATEGORIES = (
    (re.compile(r"(^|/)icons(/|$)"), "icon (icon theme category)"),
    (re.compile(r"^shapes/stars(/|$)"), "star shape (generated series)"),
    (re.compile(r"^special/gradients(/|$)"), "gradient swatch, not a drawing"),
    (re.compile(r"^unsorted/duplicates(/|$)"), "duplicate (unsorted/duplicates)"),
)
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


def find_svg_root(source: Path) -> Path:
    """The folder holding the SVG tree inside an unpacked package (or ``source`` itself)."""
    for cand in (source / SVG_ROOT, source / "svg", source):
        if cand.is_dir() and any(cand.rglob("*.svg")):
            return cand
    raise LittuneError(f"--source {source}: no .svg files found")


def scan(root: Path) -> tuple[list[Clip], list[tuple[str, str]], int]:
    """Walk the tree: usable clips (sorted by id), ``(relative path, reason)`` for the rest, file count."""
    from tqdm import tqdm

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".svg")
    clips, skipped = [], []
    first_of: dict[str, str] = {}
    for p in tqdm(files, desc="openclipart: reading", unit="file", file=sys.stderr, disable=None, mininterval=0.5):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            target = os.path.relpath(p.resolve(), root)
            skipped.append((rel, f"duplicate: symlink to {target}"))
            continue
        if not p.is_file():
            continue
        category = p.relative_to(root).parent.as_posix()
        reason = next((why for rx, why in DROP_CATEGORIES if rx.search(category)), None)
        if reason:
            skipped.append((rel, reason))
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest in first_of:
            skipped.append((rel, f"duplicate: same bytes as {first_of[digest]}"))
            continue
        first_of[digest] = rel
        clip, reason = parse_clip(p, root)
        if reason:
            skipped.append((rel, reason))
        else:
            clips.append(clip)
    _name_series(clips)
    ids = Counter(c.id for c in clips)
    for c in clips:  # ids are unique by construction unless odd characters collapsed
        if ids[c.id] > 1:
            c.id = f"{c.id}_{hashlib.sha256(str(c.path).encode()).hexdigest()[:8]}"
    return sorted(clips, key=lambda c: c.id), skipped, len(files)


def stem_words(path: Path, creator: str = "") -> str:
    """Words of a file name, without the ``_01`` suffix and the author's name: a fallback title."""
    words = path.stem.replace("_", " ").replace("-", " ").split()
    drop = {w.lower() for w in creator.split() if len(w) > 2}
    words = [w for w in words if w.lower() not in drop]
    while words and re.fullmatch(r"0\d|\d{3,}", words[-1]):
        words.pop()
    text = " ".join(words)
    return re.sub(r"(?<=[a-z])\d+$", "", text).strip()


def _name_series(clips: list[Clip], min_shared: int = 3) -> None:
    """Collection titles ("AIGA Symbol Signs" on 122 files) get the file name in front; boilerplate
    descriptions shared by several files are dropped."""
    titles = Counter(c.title.casefold() for c in clips)
    descs = Counter(c.description.casefold() for c in clips if c.description)
    for c in clips:
        if descs.get(c.description.casefold(), 0) >= min_shared:
            c.description = ""
        if titles[c.title.casefold()] >= min_shared:
            words = stem_words(c.path, c.creator)
            if words and words.casefold() != c.title.casefold():
                c.series = c.title
                c.title = f"{words} ({c.title})"


def build_openclipart(out: str | Path, *, source: str | Path | None = None, size: int = 224, seed: int = 0,
                      fractions: Sequence[float] = (0.8, 0.1, 0.1), limit: int | None = None,
                      workers: int | None = None, formats: Sequence[str] = ("csv",),
                      cache: str | Path | None = None, shard_size: int = 1000, log=None) -> dict:
    """Build the Openclipart dataset in ``out`` and return its manifest (also in manifest.json).

    ``source``: an SVG folder, an unpacked package, or an ``openclipart-svg_*.deb`` (default:
    fetched with apt-get into the cache); ``fractions``: train/val/test shares; ``limit``: keep only
    this many usable drawings (a seeded choice) for a quick build. Idempotent.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise LittuneError(f"--split {','.join(map(str, fractions))}: need three non-negative shares summing to 1")
    if limit is not None and limit < 1:
        raise LittuneError(f"--limit {limit}: must be at least 1")
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in ("csv", "wds")]
    if bad or not formats:
        raise LittuneError(f"--format: unknown {', '.join(bad) or '(none)'}; use csv, wds or both")
    if size < 8:
        raise LittuneError(f"--size {size}: too small")
    out = common.prepare_out(out, "openclipart")
    cache_root = common.cache_dir(cache)
    if source is None:
        src = common.fetch_deb(DEB_PACKAGE, cache_root, log=log)
    else:
        source = Path(source).expanduser()
        if source.is_file() and source.suffix == ".deb":
            src = common.fetch_deb(DEB_PACKAGE, cache_root, deb_file=source, log=log)
        elif source.is_dir():
            src = source
        else:
            raise LittuneError(f"--source {source}: not a folder or a .deb file")
    root = find_svg_root(src)
    clips, skipped, n_files = scan(root)
    if limit is not None and limit < len(clips):
        keep = common.pick_fraction([c.id for c in clips], limit / len(clips), seed, "limit:")
        clips = [c for c in clips if c.id in keep]
    if not clips:
        common.write_skipped(out / "skipped.tsv", skipped)
        raise LittuneError(f"{root}: no usable drawings among {n_files} SVG files (reasons in {out / 'skipped.tsv'})")

    # render
    jobs = [common.RenderJob(key=c.id, out=str(out / "images" / f"{c.id}.png"), svg_path=str(c.path),
                             fonts=c.has_text, crop=True) for c in clips]
    log(f"openclipart: {len(clips)} usable drawings of {len(clips) + len(skipped)} files "
        f"({sum(1 for j in jobs if Path(j.out).is_file())} on disk)")
    done, failed = common.render_all(jobs, size, out / "images" / ".render.json", workers=workers,
                                     desc="openclipart")
    by_id = {c.id: c for c in clips}
    for cid, err in sorted(failed.items()):
        skipped.append((by_id[cid].path.relative_to(root).as_posix(), f"render failed: {err}"))
    common.prune_files(out / "images", {Path(j.out) for j in jobs if j.key in done})
    clips = [c for c in clips if c.id in done]

    # split by title so a series stays together
    cuts = (fractions[0], fractions[0] + fractions[1])
    split_of = {}
    for c in clips:
        u = common.stable_fraction("title:" + (c.series or c.title).casefold(), seed)
        split_of[c.id] = "train" if u < cuts[0] else "val" if u < cuts[1] else "test"
    parts = defaultdict(list)
    for c in clips:
        parts[split_of[c.id]].append(c)
    rows_n = {}
    for split in ("train", "val", "test"):
        rows = [(f"images/{c.id}.png", cap) for c in parts[split] for cap in c.captions()]
        if split == "train" and "csv" not in formats:
            (out / "train.csv").unlink(missing_ok=True)
            rows_n[split] = None
            continue
        rows_n[split] = common.write_csv(out / f"{split}.csv", rows)
    cap_count = Counter(c.retrieval_caption.casefold() for c in parts["test"])
    retrieval = []
    for c in parts["test"]:
        if cap_count[c.retrieval_caption.casefold()] > 1:
            skipped.append((c.path.relative_to(root).as_posix(),
                            "left out of retrieval_test.csv: another test image has the same caption"))
        else:
            retrieval.append((f"images/{c.id}.png", c.retrieval_caption))
    n_retrieval = common.write_csv(out / "retrieval_test.csv", retrieval)
    shards = []
    if "wds" in formats:
        if (out / "wds").is_dir():
            shutil.rmtree(out / "wds")
        for split in ("train", "val", "test"):
            s = common.write_wds(out / "wds" / split, split,
                                 [(c.id, out / "images" / f"{c.id}.png",
                                   {"captions": c.captions(), "title": c.title, "series": c.series,
                                    "category": c.category})
                                  for c in parts[split]], shard_size)
            shards += s
    elif (out / "wds").is_dir():
        shutil.rmtree(out / "wds")

    from .render import renderer_versions

    licences = Counter(c.license or "(none stated)" for c in clips)
    manifest = {
        "builder": "openclipart", "seed": seed, "size": size, "formats": formats,
        "source": str(root), "fractions": list(fractions), "limit": limit,
        "counts": {
            "files": n_files,
            "images": len(clips), "train_images": len(parts["train"]), "val_images": len(parts["val"]),
            "test_images": len(parts["test"]), "train_rows": rows_n["train"], "val_rows": rows_n["val"],
            "test_rows": rows_n["test"], "retrieval_test_rows": n_retrieval, "render_failures": len(failed),
            "skipped": len(skipped), "train_shards": sum(1 for s in shards if s.startswith("train")),
        },
        "categories": dict(Counter(c.category.split("/")[0] or "(top)" for c in clips).most_common()),
        "licenses": dict(licences.most_common()),
        "renderers": renderer_versions(),
        "render_counts": dict(Counter(done[c.id] for c in clips)),
        "build_seconds": round(time.time() - t0, 1),
    }
    common.write_skipped(out / "skipped.tsv", skipped)
    common.write_json(out / "manifest.json", manifest)
    common.write_text(out / "datacard.md", _datacard(manifest, skipped))
    log(f"openclipart: wrote {out} in {manifest['build_seconds']} s: {len(parts['train'])} train / "
        f"{len(parts['val'])} val / {len(parts['test'])} test images, {len(skipped)} skipped (see skipped.tsv)")
    return manifest


def _datacard(m: dict, skipped: list[tuple[str, str]]) -> str:
    c = m["counts"]
    reasons = Counter(re.split(r"[:(]", r)[0].strip() for _, r in skipped)
    return f"""# Openclipart 0.18 (littune data openclipart)

{c['images']} drawings from Debian's `openclipart-svg`, rendered at {m['size']} px on white with
{', '.join(f'{k} {v}' for k, v in m['renderers'].items())} (resvg first, cairosvg for the files it rejects:
{m['render_counts']}). Seed {m['seed']}. Built in {m['build_seconds']} s.

Licence: Openclipart's public-domain dedication (Debian copyright file: "creative commons Public
Domain Dedication"). Licence URIs stated in the files: {m['licenses']}.

## Splits

Split {', '.join(f'{f:.0%}' for f in m['fractions'])} (train/val/test) by a seeded hash of the casefolded title
(the collection name for a series), so drawings that share a title stay in one split.
`retrieval_test.csv` has one caption per test image (title and keywords) and leaves out images
whose caption another test image has.

{common.markdown_table(("split", "images", "csv rows"), [
    ("train", c['train_images'], c['train_rows']), ("val", c['val_images'], c['val_rows']),
    ("test", c['test_images'], c['test_rows']), ("retrieval_test.csv", c['retrieval_test_rows'], c['retrieval_test_rows'])])}

Captions: the cleaned title, the title with its keywords, and the description when there is one
(descriptions shared by three or more files are boilerplate and dropped). A title shared by three or
more files is a collection name; those drawings are titled "<file name words> (<collection>)".
Titles are noisy and partly Italian or French. Drawings are cropped to their drawn pixels and
fitted with a 4% white margin.

Top-level categories: {', '.join(f'{k} {v}' for k, v in m['categories'].items())}.

## Skipped ({c['skipped']}, see skipped.tsv)

{common.markdown_table(("reason", "count"), sorted(reasons.items(), key=lambda kv: -kv[1]))}
"""
