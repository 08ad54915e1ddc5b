"""Drawing many pictures: a process pool that re-renders only what changed.

:func:`render_all` draws every :class:`RenderJob` (an SVG given as text or as a file, and where its
PNG goes) whose PNG is missing or was drawn from something else, in a process pool with a progress
bar on stderr. A stamp file records, for each key, a digest of the SVG bytes and the drawing
settings (:func:`job_digest`), so a second run reuses the PNGs on disk and a changed icon is drawn
again. One picture is drawn by :func:`littune.builders.render.render_png`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..fileio import atomic_write, write_json
from .output import read_json


@dataclass(frozen=True)
class RenderJob:
    """One picture to draw: an SVG given as text or as a file, and where its PNG goes."""

    key: str
    out: str
    svg: str | None = None
    svg_path: str | None = None
    fonts: bool = False
    crop: bool = False


def _render_one(job: RenderJob, size: int) -> tuple[str, str, str]:
    from .render import RenderError, render_png

    try:
        svg = job.svg if job.svg is not None else Path(job.svg_path).read_bytes()
        png, renderer = render_png(svg, size=size, fonts=job.fonts, crop=job.crop)
        # not fsync'ed: thousands of renders that can be redone would pay ~5 ms each
        atomic_write(job.out, png, durable=False)
        return job.key, "ok", renderer
    except (RenderError, OSError, ValueError) as e:
        return job.key, "error", str(e) or type(e).__name__


def _worker(args):
    return _render_one(*args)


def default_workers() -> int:
    """Worker processes for rendering: the usable CPU cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def job_digest(job: RenderJob, size: int) -> str:
    """What a PNG was drawn from: the SVG bytes and the drawing settings (a changed icon re-renders)."""
    from .render import RENDER_VERSION

    h = hashlib.sha256(f"{RENDER_VERSION}|{size}|{job.fonts}|{job.crop}|".encode())
    h.update(job.svg.encode() if job.svg is not None else Path(job.svg_path).read_bytes())
    return h.hexdigest()[:20]


def render_all(jobs: Sequence[RenderJob], size: int, stamp: Path, workers: int | None = None,
               desc: str = "rendering", progress: bool = True) -> tuple[dict[str, str], dict[str, str]]:
    """Render every job whose PNG is missing or was drawn from something else, in parallel.

    ``stamp`` (a JSON file) records, for each key, a digest of the SVG and settings its PNG was
    drawn from, so a second run re-renders only what changed. Returns ``(done, failed)``: key ->
    renderer (``"cached"`` for PNGs reused), and key -> error message. Progress goes to stderr
    (``progress=False``: no bar, for a build running beside another).
    """
    digests, done, failed, todo = _plan(jobs, size, read_json(stamp).get("digests", {}))
    if todo:
        from .render import require_renderer

        require_renderer()
    try:
        if todo:
            _draw(todo, size, workers, desc if progress else None, done, failed)
    finally:  # record what is on disk now, also after an interruption
        write_json(stamp, {"size": size, "digests": {k: digests[k] for k in sorted(done)}})
    return done, failed


def _plan(jobs: Sequence[RenderJob], size: int, old: dict[str, str]):
    """``(digests, done, failed, todo)``: a job whose PNG is on disk and was drawn from the same
    digest is done (``"cached"``); an SVG file that cannot be read has failed; the rest are to do."""
    digests: dict[str, str] = {}
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    todo = []
    for j in jobs:
        try:
            digests[j.key] = job_digest(j, size)
        except OSError as e:
            failed[j.key] = f"unreadable ({e.strerror or e})"
            continue
        if os.path.isfile(j.out) and old.get(j.key) == digests[j.key]:
            done[j.key] = "cached"
        else:
            todo.append(j)
    return digests, done, failed, todo


def _draw(todo: Sequence[RenderJob], size: int, workers: int | None, desc: str | None,
          done: dict[str, str], failed: dict[str, str]) -> None:
    """Render ``todo`` in up to ``workers`` processes (at least 8 jobs each), filling ``done`` and ``failed``
    (a progress bar named ``desc``; None: no bar)."""
    from tqdm import tqdm

    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(todo) // 8))
    args = [(j, size) for j in todo]
    bar = tqdm(total=len(todo), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=None if desc is not None else True, mininterval=0.5)
    pool = None
    try:
        if workers <= 1:
            results = map(_worker, args)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers)
            results = pool.imap_unordered(_worker, args, chunksize=16)
        for key, status, info in results:
            (done if status == "ok" else failed)[key] = info
            bar.update(1)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        bar.close()
        if pool is not None:  # interrupted or failed: stop the workers
            pool.terminate()
