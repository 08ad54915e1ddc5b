"""Building the Openclipart dataset, as a recipe: fetch the package, scan and filter the drawings,
draw them cropped to their pixels, split by title, write the tables, the retrieval table, the
WebDataset shards, ``skipped.tsv``, ``manifest.json`` and ``datacard.md``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ...errors import LittuneError
from ...fileio import write_skipped
from ..fetch import cache_dir
from ..output import check_formats, prepare_out, prune_files, skipped_rows, write_csv, write_report, write_wds
from ..render_pool import RenderJob, render_all
from ..splits import pick_fraction, stable_fraction
from .card import datacard
from .clips import Clip
from .scan import fetch_source, find_svg_root, scan

SPLITS = ("train", "val", "test")
Skipped = list[tuple[str, str]]  # (where, message): one row of skipped.tsv each


@dataclass(frozen=True)
class ClipartOptions:
    """The checked settings of one build (see :func:`build_openclipart`)."""

    size: int
    seed: int
    fractions: tuple[float, float, float]
    limit: int | None
    workers: int | None
    formats: list[str]
    shard_size: int
    progress: bool = True  # the rendering's progress bar


def check_options(size: int, seed: int, fractions: Sequence[float], limit: int | None, workers: int | None,
                  formats: Sequence[str], shard_size: int) -> ClipartOptions:
    """The settings, checked (a one-line error for each bad one)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise LittuneError(f"--split {','.join(map(str, fractions))}: need three non-negative shares summing to 1")
    if limit is not None and limit < 1:
        raise LittuneError(f"--limit {limit}: must be at least 1")
    formats = check_formats(formats)
    if size < 8:
        raise LittuneError(f"--size {size}: too small")
    return ClipartOptions(size, seed, tuple(fractions), limit, workers, formats, shard_size)


def draw(out: Path, clips: list[Clip], root: Path, opts: ClipartOptions, n_skipped: int, log,
         skipped: Skipped) -> tuple[list[Clip], dict[str, str], dict[str, str]]:
    """Draw each clip into ``images/<id>.png`` (cropped, system fonts where it has text) and remove
    stale images; returns the clips drawn and render_all's ``(done, failed)``."""
    jobs = [RenderJob(key=c.id, out=str(out / "images" / f"{c.id}.png"), svg_path=str(c.path),
                      fonts=c.has_text, crop=True) for c in clips]
    log(f"openclipart: {len(clips)} usable drawings of {len(clips) + n_skipped} files "
        f"({sum(1 for j in jobs if Path(j.out).is_file())} on disk)")
    done, failed = render_all(jobs, opts.size, out / "images" / ".render.json", workers=opts.workers,
                              desc="openclipart", progress=opts.progress)
    by_id = {c.id: c for c in clips}
    for cid, err in sorted(failed.items()):
        skipped.append((by_id[cid].path.relative_to(root).as_posix(), f"render failed: {err}"))
    prune_files(out / "images", {Path(j.out) for j in jobs if j.key in done})
    return [c for c in clips if c.id in done], done, failed


def split_by_title(clips: Sequence[Clip], fractions: Sequence[float], seed: int) -> dict[str, list[Clip]]:
    """train/val/test by a seeded hash of the casefolded title (the collection name for a series),
    so drawings that share a title stay in one split."""
    cuts = (fractions[0], fractions[0] + fractions[1])
    parts: dict[str, list[Clip]] = {split: [] for split in SPLITS}
    for c in clips:
        u = stable_fraction("title:" + (c.series or c.title).casefold(), seed)
        parts["train" if u < cuts[0] else "val" if u < cuts[1] else "test"].append(c)
    return parts


def write_tables(out: Path, parts: dict[str, list[Clip]], formats: Sequence[str]) -> dict[str, int | None]:
    """``<split>.csv`` with every caption of every drawing (no ``train.csv`` without ``csv``); row counts."""
    rows_n: dict[str, int | None] = {}
    for split in SPLITS:
        if split == "train" and "csv" not in formats:
            (out / "train.csv").unlink(missing_ok=True)
            rows_n[split] = None
            continue
        rows = [(f"images/{c.id}.png", cap) for c in parts[split] for cap in c.captions()]
        rows_n[split] = write_csv(out / f"{split}.csv", rows)
    return rows_n


def write_retrieval(out: Path, test: Sequence[Clip], root: Path, skipped: Skipped) -> int:
    """``retrieval_test.csv``: one caption per test image, without images whose caption another has."""
    cap_count = Counter(c.retrieval_caption.casefold() for c in test)
    retrieval = []
    for c in test:
        if cap_count[c.retrieval_caption.casefold()] > 1:
            skipped.append((c.path.relative_to(root).as_posix(),
                            "left out of retrieval_test.csv: another test image has the same caption"))
        else:
            retrieval.append((f"images/{c.id}.png", c.retrieval_caption))
    return write_csv(out / "retrieval_test.csv", retrieval)


def write_shards(out: Path, parts: dict[str, list[Clip]], opts: ClipartOptions) -> list[str]:
    """``wds/<split>/<split>-NNNNNN.tar`` (with ``wds``; an earlier ``wds/`` is removed); shard names."""
    if (out / "wds").is_dir():
        shutil.rmtree(out / "wds")
    if "wds" not in opts.formats:
        return []
    shards = []
    for split in SPLITS:
        shards += write_wds(out / "wds" / split, split,
                            [(c.id, out / "images" / f"{c.id}.png",
                              {"captions": c.captions(), "title": c.title, "series": c.series,
                               "category": c.category})
                             for c in parts[split]], opts.shard_size)
    return shards


def clipart_manifest(opts: ClipartOptions, root: Path, n_files: int, clips: Sequence[Clip],
                     parts: dict[str, list[Clip]], rows_n: dict, n_retrieval: int, renders: tuple[dict, dict],
                     shards: Sequence[str], n_skipped: int, t0: float) -> dict:
    """The build's ``manifest.json``: settings, counts, categories, licences, renderers, build time."""
    from ..render import renderer_versions

    done, failed = renders
    licences = Counter(c.license or "(none stated)" for c in clips)
    return {
        "builder": "openclipart", "seed": opts.seed, "size": opts.size, "formats": opts.formats,
        "source": str(root), "fractions": list(opts.fractions), "limit": opts.limit,
        "counts": {
            "files": n_files,
            "images": len(clips), "train_images": len(parts["train"]), "val_images": len(parts["val"]),
            "test_images": len(parts["test"]), "train_rows": rows_n["train"], "val_rows": rows_n["val"],
            "test_rows": rows_n["test"], "retrieval_test_rows": n_retrieval, "render_failures": len(failed),
            "skipped": n_skipped, "train_shards": sum(1 for s in shards if s.startswith("train")),
        },
        "categories": dict(Counter(c.category.split("/")[0] or "(top)" for c in clips).most_common()),
        "licenses": dict(licences.most_common()),
        "renderers": renderer_versions(),
        "render_counts": dict(Counter(done[c.id] for c in clips)),
        "build_seconds": round(time.time() - t0, 1),
    }


def build_openclipart(out: str | Path, *, source: str | Path | None = None, size: int = 224, seed: int = 0,
                      fractions: Sequence[float] = (0.8, 0.1, 0.1), limit: int | None = None,
                      workers: int | None = None, formats: Sequence[str] = ("csv",),
                      cache: str | Path | None = None, shard_size: int = 1000, log=None,
                      progress: bool = True) -> dict:
    """Build the Openclipart dataset in ``out`` and return its manifest (also in manifest.json).

    ``source``: an SVG folder, an unpacked package, or an ``openclipart-svg_*.deb`` (default:
    fetched with apt-get into the cache); ``fractions``: train/val/test shares; ``limit``: keep only
    this many usable drawings (a seeded choice) for a quick build; ``progress=False``: no progress
    bar. Idempotent.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    opts = replace(check_options(size, seed, fractions, limit, workers, formats, shard_size), progress=progress)
    out = prepare_out(out, "openclipart")
    root = find_svg_root(fetch_source(source, cache_dir(cache), log))
    clips, skipped, n_files = scan(root)
    if limit is not None and limit < len(clips):
        keep = pick_fraction([c.id for c in clips], limit / len(clips), seed, "limit:")
        clips = [c for c in clips if c.id in keep]
    if not clips:
        write_skipped(out / "skipped.tsv", skipped_rows(skipped))
        raise LittuneError(f"{root}: no usable drawings among {n_files} SVG files (reasons in {out / 'skipped.tsv'})")
    clips, done, failed = draw(out, clips, root, opts, len(skipped), log, skipped)
    parts = split_by_title(clips, opts.fractions, seed)
    rows_n = write_tables(out, parts, opts.formats)
    n_retrieval = write_retrieval(out, parts["test"], root, skipped)
    shards = write_shards(out, parts, opts)
    manifest = clipart_manifest(opts, root, n_files, clips, parts, rows_n, n_retrieval, (done, failed), shards,
                                len(skipped), t0)
    write_report(out, manifest, skipped, datacard)
    log(f"openclipart: wrote {out} in {manifest['build_seconds']} s: {len(parts['train'])} train / "
        f"{len(parts['val'])} val / {len(parts['test'])} test images, {len(skipped)} skipped (see skipped.tsv)")
    return manifest
