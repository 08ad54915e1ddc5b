"""Writing a cache: :func:`embed_source` runs the locked tower over a source; :func:`write_cache`
stores features computed elsewhere. Both write the format of :mod:`.format`.

``embed_source`` reads like its recipe: check the options, make the plan, lock and prepare the
directory (rank 0), find the shards still to do, embed them (:func:`.shards.run_shards`, calling the
tower through :func:`.forward.tower_forward`), then, once every rank is done, write the global
tables and the manifest (rank 0). :func:`write_cache` (features computed elsewhere) is :mod:`.precomputed`'s.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..data.decode import DEFAULT_MAX_PIXELS
from ..errors import LittuneError
from ..towers.runtime import check_runtime, module_device
from .format import DTYPES, MANIFEST, make_plan, manifest_entry, plan_hash, shard_complete, write_tables
from .forward import tower_forward
from .lock import drop_previous, lock, prepare, unlock
from .precomputed import write_cache  # noqa: F401 - littune.cache.writer.write_cache, as before
from .reader import EmbeddingCache
from .reuse import Report, remove_decisions
from .reuse import start as start_reuse
from .shards import run_shards
from .tokens import check_request, resolve
from .workers import default_batch_size, default_lanes, default_threads, default_workers


def embed_source(source, tower, out_dir: str | Path, *, dtype: str = "float16", views: int = 0,
                 batch_size: int | None = None, workers: int | None = None, shard_size: int = 2048,
                 resume: bool = True, progress: bool = True, seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 device: str | torch.device | None = None, distributed: bool = False,
                 lanes: int | None = None, threads: int | None = None, runtime: str = "auto",
                 reuse: bool = True, tokens: bool | int | None = None) -> EmbeddingCache:
    """Run the locked ``tower`` over every image of ``source`` and write the cache in ``out_dir``.

    ``source``: a :class:`~littune.data.sources.Source` or anything :func:`open_source` takes;
    ``tower``: an :class:`~littune.towers.image.ImageTower` or a tower spec. ``views`` augmented
    views (Inception crop + flip) are stored per image besides the eval view. Speed settings:
    ``workers`` decoding processes (0: decode in this process), ``batch_size`` images per forward
    pass, ``lanes`` concurrent forward passes of ``threads`` torch threads each (defaults:
    :func:`default_workers`, :func:`default_batch_size`, :func:`default_lanes`, :func:`default_threads`;
    on 2 cores: 1 worker, batches of 16, 2 single-threaded lanes). Workers and lanes never change
    the cache's bytes; the thread count can change the last bits of a float32 feature. ``runtime``
    (:mod:`littune.towers.runtime`: ``auto``, ``torch`` or ``onnxruntime``) says what computes the features;
    it does not change the tower's fingerprint (the runtimes agree far inside float16 rounding) and
    each shard records its runtime, the manifest all of them.
    ``resume`` continues an interrupted run (``False`` starts over). With ``distributed=True`` every
    rank of the initialised process group must call this; the shards are split over the ranks.
    ``reuse``: copy the rows that earlier caches hold for the same image files, computed the same way,
    instead of embedding them again (:mod:`.reuse`); every shard written is entered in the feature index
    either way. ``tokens``: also store the eval view's spatial map from the same forward pass (True: the
    tower's own grid; ``GRID``: average-pooled to at most ``GRID x GRID``), float16 (:mod:`.tokens`).
    Returns the opened cache; its ``reuse`` (a :class:`.reuse.Report`) says what was embedded and copied."""
    _check_options(dtype, views, batch_size, shard_size, workers)
    check_runtime(runtime)
    tokens = check_request(tokens)
    source, tower = _open_inputs(source, tower)
    workers = default_workers() if workers is None else int(workers)
    rank, world = _rank_and_world(distributed)
    out = Path(os.path.expanduser(str(out_dir)))
    records = source.records()
    if not records:
        raise LittuneError(f"{source.describe()} holds no images")
    with _embedding(tower):
        plan = make_plan(tower, dim=tower.dim, source_fingerprint=source.fingerprint(), source=source.describe(),
                         records=len(records), shard_size=shard_size, dtype=dtype, views=views, seed=seed,
                         max_pixels=max_pixels, tokens=resolve(tower, tokens))
        phash = plan_hash(plan)
        with _disk_full_is_one_line(out, plan, phash):
            held = _claim(out, plan, resume, rank, world, reuse)
        try:
            with _disk_full_is_one_line(out, plan, phash):
                mine, todo, pending = _shards_to_do(out, plan, phash, rank, world)
                if pending and rank == 0:
                    (out / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until _finalize
                _barrier(world)
                report = Report() if not todo else _embed_shards(
                    out, records, todo, tower, plan, phash, device, runtime, _record_counts(plan, mine, todo),
                    progress=progress and rank == 0, speed=(batch_size, workers, lanes, threads), reuse=(reuse, rank))
                _barrier(world)
                if rank == 0 and (pending or not (out / MANIFEST).exists()):
                    _finalize(out, source, records, plan, phash)
        finally:
            if held is not None:
                unlock(held)
    _barrier(world)
    return _opened(out, _gathered(report, world))


@contextmanager
def _disk_full_is_one_line(out: Path, plan: dict, phash: str):
    """A full disk (or quota) while writing the cache ``out`` becomes one :class:`LittuneError` saying what
    is on disk and how to go on (every file is written atomically: complete shards are kept)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        n = plan["shards"]
        done = sum(1 for s in range(n) if shard_complete(out, s, phash, verify=False) is not None)
        what = (f"{done} of {n} shard{'s' if n != 1 else ''} are complete and kept" if done < n else
                f"all {n} shards are complete and kept, the tables and manifest are not written")
        at = f" ({e.filename})" if e.filename else ""
        raise LittuneError(f"disk full ({e.strerror}) writing the cache {out}{at}: {what}; free some space and "
                           "run the same command again to resume") from None


def _embed_shards(out: Path, records, todo: list[int], tower, plan: dict, phash: str, device, runtime: str,
                  counts: tuple[int, int], progress: bool, speed: tuple, reuse: tuple[bool, int]) -> Report:
    """Embed shards ``todo`` with the tower on ``runtime`` (threads set first: onnxruntime takes them), copying
    the rows of earlier caches where the feature index has them (``reuse``: whether to look, and this process's
    rank). Returns what was embedded and copied."""
    dev = torch.device(device) if device is not None else module_device(tower)
    settings = _speed(dev, *speed)
    forward = tower_forward(tower, dev, runtime, threads=torch.get_num_threads(), tokens=plan.get("tokens"),
                            every=1 + int(plan["views"]))
    size, n = plan["shard_size"], len(records)
    run = None
    try:
        run = start_reuse(out, records, [(s, s * size, min(n, (s + 1) * size)) for s in todo], plan, phash,
                          tower.preprocess, f"{forward.runtime}/{dev.type}", look=reuse[0], rank=reuse[1])
        run_shards(out, records, todo, forward, tower.preprocess, plan, phash, **settings, progress=progress,
                   done=counts[0], total=counts[1], reuse=run)
        return run.report
    finally:
        forward.close()
        if run is not None:
            run.close()


def _opened(out: Path, report: Report) -> EmbeddingCache:
    cache = EmbeddingCache.open(out, verify=False)
    cache.reuse = report
    return cache


def _gathered(report: Report, world: int) -> Report:
    """The reports of every rank, added up."""
    if world == 1:
        return report
    reports: list = [None] * world
    torch.distributed.all_gather_object(reports, report)
    total = Report()
    for r in reports:
        total.add(r)
    return total


def _check_options(dtype: str, views: int, batch_size: int | None, shard_size: int, workers: int | None) -> None:
    if dtype not in DTYPES:
        raise LittuneError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if views < 0:
        raise LittuneError(f"views must be >= 0, not {views}")
    if (batch_size is not None and batch_size < 1) or shard_size < 1:
        raise LittuneError(f"batch_size and shard_size must be >= 1 (got {batch_size}, {shard_size})")
    if workers is not None and int(workers) < 0:
        raise LittuneError(f"workers must be >= 0, not {workers}")


def _open_inputs(source, tower):
    """A source and a tower from what the caller gave (objects, paths or specs)."""
    from ..data.sources import open_source
    from ..towers.image import build_image_tower

    if not hasattr(source, "records"):
        source = open_source(source)
    if not isinstance(tower, torch.nn.Module):
        tower = build_image_tower(tower)
    return source, tower


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


@contextmanager
def _embedding(tower):
    """The tower in eval mode for the run; its mode and torch's thread count restored afterwards."""
    was_training, old_threads = tower.training, torch.get_num_threads()
    tower.eval()
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        tower.train(was_training)


def _claim(out: Path, plan: dict, resume: bool, rank: int, world: int, reuse: bool = True):
    """Rank 0 locks ``out`` and prepares it for ``plan`` (a cache it replaces kept readable, with ``reuse``);
    every rank learns whether it could (and raises the same error if not). Returns rank 0's lock (None on the
    other ranks)."""
    held, error = None, None
    if rank == 0:
        try:
            held = lock(out)
            prepare(out, plan, resume, keep_previous=reuse)
        except LittuneError as e:
            error = e
    if world > 1:
        flag = [str(error) if error else ""]
        torch.distributed.broadcast_object_list(flag, src=0)
        if flag[0]:
            error = error or LittuneError(flag[0])
    if error:
        if held is not None:
            unlock(held)
        raise error
    return held


def _shards_to_do(out: Path, plan: dict, phash: str, rank: int, world: int) -> tuple[list[int], list[int], int]:
    """This rank's shards, those of them not complete yet, and the number not complete over all ranks."""
    mine = [s for s in range(plan["shards"]) if s % world == rank]
    todo = [s for s in mine if shard_complete(out, s, phash) is None]
    pending = len(todo)
    if world > 1:
        t = torch.tensor([pending], dtype=torch.int64)
        torch.distributed.all_reduce(t)
        pending = int(t.item())
    return mine, todo, pending


def _record_counts(plan: dict, mine: list[int], todo: list[int]) -> tuple[int, int]:
    """Records of this rank's shards already done, and of all its shards (the progress bar's range)."""
    size, n = plan["shard_size"], plan["records"]
    count = {s: min(size, n - s * size) for s in mine}
    return sum(c for s, c in count.items() if s not in todo), sum(count.values())


def _speed(device: torch.device, batch_size: int | None, workers: int, lanes: int | None,
           threads: int | None) -> dict:
    """The batch size, workers and lanes of the run (defaults for ``device``); sets torch's threads."""
    batch_size = default_batch_size(device) if batch_size is None else int(batch_size)
    lanes = default_lanes(device) if lanes is None else max(1, int(lanes))
    torch.set_num_threads(default_threads(workers, lanes) if threads is None else max(1, int(threads)))
    return {"batch_size": batch_size, "workers": workers, "lanes": lanes}


def _finalize(out: Path, source, records, plan: dict, phash: str) -> None:
    """Rank 0, once every shard is complete: global key/caption tables, skipped.tsv, manifest."""
    shards, source_index, skipped = [], [], []
    start = 0
    for s in range(plan["shards"]):
        meta = shard_complete(out, s, phash, verify=False)
        if meta is None:
            raise LittuneError(f"shard {s} of {out} is missing or incomplete; run `littune embed` again to finish it")
        lo = meta["records"][0]
        source_index.extend(lo + g for g in meta["good"])
        skipped.extend(meta["skipped"])
        shards.append(manifest_entry(s, start, meta))
        start += meta["count"]
    remove_decisions(out)  # before the manifest: every shard is complete, nothing is decided any more
    drop_previous(out)
    problems = [[w, "index", r] for w, r in getattr(source, "problems", [])]
    good = [records[i] for i in source_index]
    caps = [c for r in good for c in r.captions]
    langs = [lang for r in good for lang in (r.langs or [""] * len(r.captions))] if any(r.langs for r in good) else None
    write_tables(out, plan, shards, [r.key for r in good], [r.where for r in good], caps,
                 [len(r.captions) for r in good], source_index, skipped, problems, caption_langs=langs)
