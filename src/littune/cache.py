"""The image-embedding cache: run a locked image tower over a source once, train from it forever.

With a locked image tower (the ``L`` of ``Lu``) the image features never change, so littune
computes them once. :func:`embed_source` (the library behind ``littune embed``) decodes a source's
images in worker processes, runs the tower in batches under ``torch.inference_mode()`` and writes
a cache directory; :class:`EmbeddingCache` reads it back by index. Training then needs neither the
images nor the image model. :func:`write_cache` writes the same format from features computed elsewhere.

Layout of a cache directory::

    manifest.json             count, dim, dtype, views, tower + source fingerprints, shard checksums
    plan.json                 what is being computed (lets an interrupted run resume)
    shards/00000.npy          (n, 1 + views, dim) float16/float32: view 0 = eval (centre crop),
    shards/00000.json         then the augmented views; the json is the shard's commit record
    keys.utf8, key_offsets.npy             image keys (one UTF-8 blob + int64 offsets)
    paths.utf8, path_offsets.npy           where each image came from
    captions.utf8, caption_offsets.npy     every caption; image_captions.npy maps image -> captions
    source_index.npy          each cached image's position in the source
    skipped.tsv               images that could not be decoded: where, reason, detail

Work is cut into shards of ``shard_size`` consecutive source records. A shard's features are written
to a temporary name, fsync'ed and renamed, then its json (with the sha256 of the features file) is
written the same way: a shard is complete exactly when its json exists and the checksum matches.
A run that is killed at any moment (even ``kill -9``) resumes from the complete shards and redoes
the rest; batches never cross a shard boundary and augmentation seeds depend only on the image key,
so the resumed cache is byte-identical to an uninterrupted one. Images that fail to decode are not
in the cache: indices run over the good images in source order, and ``skipped.tsv`` lists the others.

Speed: decoding runs in worker processes and overlaps the forward; on a CPU the forward runs on
two "lanes" (two single-threaded batches of 16 at once), which keeps 2 cores busier than one
batch on 2 threads. A ``.lock`` file keeps a second writer out of a directory being written.

Under ``torchrun`` (``distributed=True``) rank ``r`` embeds shards ``r, r + W, ...`` and rank 0 writes
the manifest after a barrier; the result equals a one-process run. The reader keeps at most
``max_open`` shard files open and reads rows with ``pread`` (no memory map: touched pages of a map
would count in the process's RSS), so memory stays constant whatever the cache size and however many
rows have been read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import sys
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.decode import DEFAULT_MAX_PIXELS, REASONS, BadImage
from .hashing import hash_file
from .errors import LittuneError, StaleCacheError

FORMAT = "littune-embedding-cache"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SKIPPED = "skipped.tsv"
LOCK = ".lock"
SHARD_DIR = "shards"
DTYPES = ("float16", "float32")
_OUR_FILES = (MANIFEST, PLAN, SKIPPED, "keys.utf8", "key_offsets.npy", "paths.utf8", "path_offsets.npy",
              "captions.utf8", "caption_offsets.npy", "image_captions.npy", "source_index.npy")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decoding worker processes: one per two cores, at least 2 (1 on a single core), at most 6.

    Two workers on 2 cores fill the prefetch queue twice as fast at the start and whenever the
    forward lanes leave a core idle; they sleep once a batch of decoded images is waiting.
    """
    cores = _cores()
    return 1 if cores < 2 else max(2, min(6, cores // 2))


def default_batch_size(device: str | torch.device | None = None) -> int:
    """Images per forward pass: 16 on a CPU (activations stay in cache: ~1.7x the images/s of 64 for
    EfficientNet-Lite0 on 2 cores), 64 on an accelerator."""
    if device is not None and torch.device(device).type != "cpu":
        return 64
    return 16


def default_lanes(device: str | torch.device | None = None) -> int:
    """Concurrent forward passes: 2 on a CPU with 2+ cores, 1 on an accelerator.

    Two single-threaded forwards keep 2 cores busier than one forward on 2 threads (whose threads
    wait for each other at every operator, and lose more when a decoding worker takes a core).
    """
    if device is not None and torch.device(device).type != "cpu":
        return 1
    return 2 if _cores() >= 2 else 1


def default_threads(workers: int, lanes: int) -> int:
    """torch intra-op threads per lane: the cores left after the decoding workers, shared by the lanes
    (``OMP_NUM_THREADS``, e.g. set by torchrun, is respected)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return max(1, (_cores() - workers) // max(1, lanes))


# ---------------------------------------------------------------------------------------------
# small file helpers: atomic writes, checksums
def _sha256(path: Path) -> str:
    return hash_file(path)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Write via ``write(file)`` to a temporary name, fsync, rename over ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()))


def _write_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def _write_strings(directory: Path, stem: str, offsets_name: str, strings: Sequence[str]) -> dict:
    blob = bytearray()
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    for i, s in enumerate(strings):
        blob += s.encode("utf-8")
        offsets[i + 1] = len(blob)
    _atomic_write(directory / f"{stem}.utf8", lambda f: f.write(bytes(blob)))
    _write_npy(directory / offsets_name, offsets)
    return {f"{stem}.utf8": _sha256(directory / f"{stem}.utf8"), offsets_name: _sha256(directory / offsets_name)}


def _plan_hash(plan: dict) -> str:
    core = {k: plan[k] for k in sorted(plan) if k not in ("source", "tower_spec", "preprocess", "tower_name")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# decoding in worker processes
class _Decode(torch.utils.data.Dataset):
    """Decode + preprocess one record: eval view, then ``views`` augmented views (seeded by key)."""

    def __init__(self, records, order: list[int], preprocess, views: int, seed: int, max_pixels: int | None):
        self.records, self.order = records, order
        self.preprocess, self.views, self.seed, self.max_pixels = preprocess, views, seed, max_pixels

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        i = self.order[j]
        rec = self.records[i]
        try:
            img = rec.open(max_pixels=self.max_pixels)
            px = [self.preprocess.eval(img)]
            for v in range(self.views):
                px.append(self.preprocess.train(img, augment_rng(self.seed, rec.key, v)))
        except BadImage as e:
            return i, None, (rec.where, e.reason, e.detail)
        except Exception as e:  # never let one file stop a run
            return i, None, (rec.where, "corrupt", f"{type(e).__name__}: {e}")
        return i, (px[0].unsqueeze(0) if len(px) == 1 else torch.stack(px)), None


def augment_rng(seed: int, key: str, view: int) -> random.Random:
    """The random stream of augmented view ``view`` of image ``key`` (independent of order and rank)."""
    return random.Random(f"littune-view|{seed}|{key}|{view}")


def _collate(items: list) -> tuple[list, torch.Tensor | None]:
    """A chunk of decoded records -> ``([(index, bad or None)], pixels of the good ones)``.

    One tensor per chunk crosses from the worker process (one shared-memory segment, not one per image).
    """
    good = [px for _, px, _ in items if px is not None]
    return [(i, bad) for i, _, bad in items], (torch.stack(good) if good else None)


def _unchunk(chunk: tuple[list, torch.Tensor | None]) -> list:
    entries, pixels = chunk
    out, k = [], 0
    for i, bad in entries:
        if bad is None:
            out.append((i, pixels[k], None))
            k += 1
        else:
            out.append((i, None, bad))
    return out


#: niceness added to decoding workers, so that the tower's threads win the cores when both want them
WORKER_NICE = 0


#: file descriptors of the cache locks this process holds; decoding workers close their inherited
#: copies, so that after a kill -9 of the run the lock goes with it, not with a lingering worker.
_LOCK_FDS: set[int] = set()


def _worker_init(_worker_id: int) -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()
    if WORKER_NICE:
        try:
            os.nice(WORKER_NICE)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
def _tower_device(tower: torch.nn.Module) -> torch.device:
    for p in tower.parameters():
        return p.device
    for b in tower.buffers():
        return b.device
    return torch.device("cpu")


def _make_plan(source, tower, dtype: str, views: int, shard_size: int, seed: int, max_pixels, dim: int) -> dict:
    n = len(source)
    return {
        "format": FORMAT,
        "version": VERSION,
        "tower_fingerprint": tower.fingerprint(),
        "tower_name": getattr(tower, "name", type(tower).__name__),
        "tower_spec": getattr(tower, "spec", None),
        "preprocess": tower.preprocess.to_dict(),
        "dim": int(dim),
        "source_fingerprint": source.fingerprint(),
        "source": source.describe(),
        "records": n,
        "shard_size": int(shard_size),
        "shards": (n + shard_size - 1) // shard_size,
        "dtype": dtype,
        "views": int(views),
        "seed": int(seed),
        "max_pixels": max_pixels,
    }


def _shard_paths(out: Path, s: int) -> tuple[Path, Path]:
    return out / SHARD_DIR / f"{s:05d}.npy", out / SHARD_DIR / f"{s:05d}.json"


def _shard_complete(out: Path, s: int, plan_hash: str, verify: bool = True) -> dict | None:
    """The shard's commit record if the shard is complete and its checksum matches, else None."""
    npy, js = _shard_paths(out, s)
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("plan") != plan_hash or meta.get("shard") != s or not npy.is_file():
        return None
    if npy.stat().st_size != meta.get("bytes"):
        return None
    if verify and _sha256(npy) != meta.get("sha256"):
        return None
    return meta


def _clear(out: Path) -> None:
    """Remove a previous cache's files (only littune's own) from ``out``."""
    for name in _OUR_FILES:
        (out / name).unlink(missing_ok=True)
    sd = out / SHARD_DIR
    if sd.is_dir():
        for p in sd.iterdir():
            if p.suffix in (".npy", ".json") or ".tmp-" in p.name:
                p.unlink(missing_ok=True)


def _lock(out: Path):
    """An exclusive lock on the cache directory for this run (released by the OS even on kill -9)."""
    if out.exists() and not out.is_dir():
        raise LittuneError(f"cache directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK, "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no protection against a second writer
        pass
    except OSError:
        f.close()
        raise LittuneError(f"cache {out} is being written by another `littune embed`; wait for it to finish") from None
    _LOCK_FDS.add(f.fileno())
    return f


def _unlock(f) -> None:
    _LOCK_FDS.discard(f.fileno())
    f.close()


def _prepare(out: Path, plan: dict, resume: bool) -> None:
    """Rank 0: check or reset the directory for ``plan`` and write plan.json."""
    if out.exists() and not out.is_dir():
        raise LittuneError(f"cache directory {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    old = None
    if (out / PLAN).exists():
        try:
            old = json.loads((out / PLAN).read_text())
        except ValueError:
            old = None
    elif (out / MANIFEST).exists():
        try:
            old = json.loads((out / MANIFEST).read_text()).get("plan")
        except ValueError:
            old = None
    if resume and old is not None and _plan_hash(old) != _plan_hash(plan):
        diffs = [f"{k} {old.get(k)!r} -> {plan.get(k)!r}" for k in sorted(plan)
                 if k not in ("source", "tower_spec", "preprocess", "tower_name") and old.get(k) != plan.get(k)]
        raise LittuneError(f"cache {out} was started with other settings ({'; '.join(diffs)}); "
                           "choose another --out, or pass --no-resume to overwrite it")
    if not resume or old is None:
        _clear(out)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    for p in (out / SHARD_DIR).iterdir():  # leftovers of a killed run are never trusted
        if ".tmp-" in p.name:
            p.unlink(missing_ok=True)
    for p in out.iterdir():
        if ".tmp-" in p.name and p.is_file():
            p.unlink(missing_ok=True)
    _write_json(out / PLAN, plan)


def embed_source(source, tower, out_dir: str | Path, *, dtype: str = "float16", views: int = 0,
                 batch_size: int | None = None, workers: int | None = None, shard_size: int = 2048,
                 resume: bool = True, progress: bool = True, seed: int = 0, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 device: str | torch.device | None = None, distributed: bool = False,
                 lanes: int | None = None, threads: int | None = None) -> "EmbeddingCache":
    """Run the locked ``tower`` over every image of ``source`` and write the cache in ``out_dir``.

    ``source``: a :class:`~littune.data.sources.Source` or anything :func:`open_source` takes;
    ``tower``: an :class:`~littune.towers.image.ImageTower` or a tower spec. ``views`` augmented
    views (Inception crop + flip) are stored per image besides the eval view. Speed settings:
    ``workers`` decoding processes (0: decode in this process), ``batch_size`` images per forward
    pass, ``lanes`` concurrent forward passes of ``threads`` torch threads each (defaults:
    :func:`default_workers`, :func:`default_batch_size`, :func:`default_lanes`, :func:`default_threads`;
    on 2 cores: 2 workers, batches of 16, 2 single-threaded lanes). Workers and lanes never change
    the cache's bytes; the thread count can change the last bits of a float32 feature.
    ``resume`` continues an interrupted run (``False`` starts over). With ``distributed=True`` every
    rank of the initialised process group must call this; the shards are split over the ranks.
    Returns the opened cache.
    """
    from .data.sources import open_source
    from .towers.image import build_image_tower

    if dtype not in DTYPES:
        raise LittuneError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if views < 0:
        raise LittuneError(f"views must be >= 0, not {views}")
    if (batch_size is not None and batch_size < 1) or shard_size < 1:
        raise LittuneError(f"batch_size and shard_size must be >= 1 (got {batch_size}, {shard_size})")
    if not hasattr(source, "records"):
        source = open_source(source)
    if not isinstance(tower, torch.nn.Module):
        tower = build_image_tower(tower)
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise LittuneError(f"workers must be >= 0, not {workers}")

    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def barrier():
        if world > 1:
            torch.distributed.barrier()

    out = Path(os.path.expanduser(str(out_dir)))
    records = source.records()
    if not records:
        raise LittuneError(f"{source.describe()} holds no images")
    was_training = tower.training
    tower.eval()
    lock = None
    old_threads = torch.get_num_threads()
    try:
        dim = tower.dim
        plan = _make_plan(source, tower, dtype, views, shard_size, seed, max_pixels, dim)
        phash = _plan_hash(plan)
        error = None
        if rank == 0:
            try:
                lock = _lock(out)
                _prepare(out, plan, resume)
            except LittuneError as e:
                error = e
        if world > 1:  # every rank learns whether rank 0 could prepare the directory
            flag = [str(error) if error else ""]
            torch.distributed.broadcast_object_list(flag, src=0)
            if flag[0]:
                error = error or LittuneError(flag[0])
        if error:
            raise error

        mine = [s for s in range(plan["shards"]) if s % world == rank]
        todo = [s for s in mine if _shard_complete(out, s, phash) is None]
        done_records = sum(min(shard_size, len(records) - s * shard_size) for s in mine if s not in todo)
        total_records = sum(min(shard_size, len(records) - s * shard_size) for s in mine)
        pending = len(todo)
        if world > 1:
            t = torch.tensor([pending], dtype=torch.int64)
            torch.distributed.all_reduce(t)
            pending = int(t.item())
        if pending and rank == 0:
            (out / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until _finalize
        barrier()
        dev = torch.device(device) if device is not None else _tower_device(tower)
        batch_size = default_batch_size(dev) if batch_size is None else int(batch_size)
        lanes = default_lanes(dev) if lanes is None else max(1, int(lanes))
        torch.set_num_threads(default_threads(workers, lanes) if threads is None else max(1, int(threads)))
        if todo:
            _run_shards(out, records, todo, tower, plan, phash, batch_size, workers, lanes,
                        progress and rank == 0, dev, done_records, total_records)
        barrier()
        if rank == 0 and (pending or not (out / MANIFEST).exists()):
            _finalize(out, source, records, plan, phash)
    finally:
        torch.set_num_threads(old_threads)
        tower.train(was_training)
        if lock is not None:
            _unlock(lock)
    barrier()
    return EmbeddingCache.open(out, verify=False)


class _Now:
    """A finished computation with the interface of a Future (the one-lane case)."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


def _run_shards(out: Path, records, todo: list[int], tower, plan: dict, phash: str, batch_size: int,
                workers: int, lanes: int, progress: bool, device, done: int, total: int) -> None:
    """Decode the records of shards ``todo`` (worker processes), embed them batch by batch on
    ``lanes`` concurrent forward threads, and write each shard, in order, once its batches are done."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    shard_size, views, dim = plan["shard_size"], plan["views"], plan["dim"]
    n = len(records)
    spans = [(s, s * shard_size, min(n, (s + 1) * shard_size)) for s in todo]
    order = [i for _, lo, hi in spans for i in range(lo, hi)]
    dataset = _Decode(records, order, tower.preprocess, views, plan["seed"], plan["max_pixels"])
    chunk = 4
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=chunk, shuffle=False, num_workers=workers, collate_fn=_collate,
        # about one batch of decoded images waiting, whatever the number of workers
        prefetch_factor=max(2, -(-batch_size // (chunk * workers))) if workers else None,
        persistent_workers=False, pin_memory=False,
        worker_init_fn=_worker_init if workers else None)
    dev = torch.device(device) if device is not None else _tower_device(tower)
    if dev != _tower_device(tower):
        tower.to(dev)
    np_dtype = np.float16 if plan["dtype"] == "float16" else np.float32
    bar = tqdm(total=total, initial=done, unit="img", desc="embed", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.05)

    def forward(pixels: list[torch.Tensor]) -> np.ndarray:
        x = torch.cat(pixels) if len(pixels) > 1 else pixels[0]
        with torch.inference_mode():
            y = tower(x.to(dev, non_blocking=True))
        if y.ndim != 2 or y.shape[-1] != dim:
            raise LittuneError(f"image tower {plan['tower_name']} returned shape {tuple(y.shape)}, "
                               f"expected (batch, {dim})")
        return y.float().cpu().numpy()

    pool = ThreadPoolExecutor(lanes, thread_name_prefix="littune-embed") if lanes > 1 else None
    inflight: deque = deque()  # forward jobs not yet known to be finished (bounded: memory)
    shards: deque = deque()  # shards whose records are all decoded, waiting for their forward jobs

    def submit(pixels: list[torch.Tensor]):
        fut = pool.submit(forward, pixels) if pool else _Now(forward(pixels))
        inflight.append(fut)
        while len(inflight) > 2 * lanes:
            inflight.popleft().result()
        write_ready(block=False)  # a finished shard goes to disk now, not after the next one
        return fut

    def write_ready(block: bool) -> None:
        while shards and (block or all(f.done() for f in shards[0]["jobs"])):
            job = shards.popleft()
            feats = [f.result() for f in job["jobs"]]
            arr = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
            _write_shard(out, job["shard"], arr.reshape(len(job["good"]), 1 + views, dim), np_dtype, phash,
                         [job["lo"], job["hi"]], job["good"], job["skipped"],
                         overflow="tower features exceed the float16 range", fix="use --dtype float32")

    it = iter(loader)
    buffered: list = []
    skipped_total = 0
    # Batches never cross a shard boundary, so a shard's bytes do not depend on what ran before it.
    per_batch = max(1, batch_size // (1 + views))
    try:
        for s, lo, hi in spans:
            job = {"shard": s, "lo": lo, "hi": hi, "good": [], "skipped": [], "jobs": []}
            pending: list[torch.Tensor] = []  # (1 + views, 3, S, S) per good image, in order
            for _ in range(hi - lo):
                if not buffered:
                    buffered = _next(it, workers)
                i, px, bad = buffered.pop(0)
                if px is None:
                    job["skipped"].append(list(bad))
                    skipped_total += 1
                    bar.set_postfix(skipped=skipped_total, refresh=False)
                else:
                    job["good"].append(i - lo)
                    pending.append(px)
                    if len(pending) == per_batch:
                        job["jobs"].append(submit(pending))
                        pending = []
                bar.update(1)
            if pending:
                job["jobs"].append(submit(pending))
            shards.append(job)
            write_ready(block=False)
        write_ready(block=True)
    finally:
        bar.close()
        del it
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _next(it, workers: int) -> list:
    try:
        return _unchunk(next(it))
    except RuntimeError as e:
        if workers and ("shared memory" in str(e) or "shm" in str(e)):
            raise LittuneError(f"decoding workers ran out of shared memory ({e}); use --workers 0, or give the "
                               "container more /dev/shm (docker run --shm-size 1g)") from None
        raise


def _write_shard(out: Path, shard: int, arr: np.ndarray, np_dtype, phash: str, records: list[int],
                 good: list[int], skipped: list, overflow: str, fix: str) -> dict:
    """Write shard ``shard``: the float32 ``arr`` (count, 1 + views, dim) stored as ``np_dtype``, then
    its ``.json`` (last: the shard counts as complete once that exists). Returns the metadata."""
    with np.errstate(over="ignore"):  # an overflow is caught just below, with a clear message
        stored = arr.astype(np_dtype)
    if np_dtype is np.float16 and np.isinf(stored).any() and np.isfinite(arr).all():
        raise LittuneError(f"{overflow} (max |x| = {np.abs(arr).max():.4g}); {fix}")
    npy, js = _shard_paths(out, shard)
    _write_npy(npy, stored)
    meta = {"shard": shard, "plan": phash, "records": records, "count": len(good), "bytes": npy.stat().st_size,
            "sha256": _sha256(npy), "good": good, "skipped": skipped}
    _write_json(js, meta)
    return meta


def _finalize(out: Path, source, records, plan: dict, phash: str) -> None:
    """Rank 0, once every shard is complete: global key/caption tables, skipped.tsv, manifest."""
    shards, source_index, skipped = [], [], []
    start = 0
    for s in range(plan["shards"]):
        meta = _shard_complete(out, s, phash, verify=False)
        if meta is None:
            raise LittuneError(f"shard {s} of {out} is missing or incomplete; run `littune embed` again to finish it")
        lo = meta["records"][0]
        source_index.extend(lo + g for g in meta["good"])
        skipped.extend(meta["skipped"])
        shards.append({"file": f"{SHARD_DIR}/{s:05d}.npy", "start": start, "count": meta["count"],
                       "records": meta["records"], "bytes": meta["bytes"], "sha256": meta["sha256"]})
        start += meta["count"]
    problems = [[w, "index", r] for w, r in getattr(source, "problems", [])]
    good = [records[i] for i in source_index]
    caps = [c for r in good for c in r.captions]
    _write_tables(out, plan, shards, [r.key for r in good], [r.where for r in good], caps,
                  [len(r.captions) for r in good], source_index, skipped, problems)


def _write_tables(out: Path, plan: dict, shards: list[dict], keys: Sequence[str], paths: Sequence[str],
                  captions: Sequence[str], captions_per_image: Sequence[int], source_index: Sequence[int],
                  skipped: Sequence = (), problems: Sequence = ()) -> None:
    """The global key, path and caption tables, skipped.tsv and, last, the manifest of a cache whose
    shards are written (``captions``: all captions in image order, ``captions_per_image`` their counts)."""
    files: dict[str, str] = {}
    files.update(_write_strings(out, "keys", "key_offsets.npy", keys))
    files.update(_write_strings(out, "paths", "path_offsets.npy", paths))
    files.update(_write_strings(out, "captions", "caption_offsets.npy", captions))
    per_image = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.asarray(captions_per_image, dtype=np.int64), out=per_image[1:])
    _write_npy(out / "image_captions.npy", per_image)
    _write_npy(out / "source_index.npy", np.asarray(source_index, dtype=np.int64))
    files["image_captions.npy"] = _sha256(out / "image_captions.npy")
    files["source_index.npy"] = _sha256(out / "source_index.npy")

    def clean(x: str) -> str:
        return str(x).replace("\t", " ").replace("\n", " ")

    rows = ["where\treason\tdetail"] + ["\t".join(clean(c) for c in r) for r in [*problems, *skipped]]
    _atomic_write(out / SKIPPED, lambda f: f.write(("\n".join(rows) + "\n").encode("utf-8")))
    reasons = Counter(r[1] for r in skipped)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "count": len(keys),
        "dim": plan["dim"],
        "dtype": plan["dtype"],
        "views": plan["views"],
        "tower_fingerprint": plan["tower_fingerprint"],
        "tower_name": plan["tower_name"],
        "tower_spec": plan["tower_spec"],
        "preprocess": plan["preprocess"],
        "source_fingerprint": plan["source_fingerprint"],
        "source": plan["source"],
        "records": plan["records"],
        "captions": len(captions),
        "skipped": len(skipped),
        "skipped_by_reason": {r: reasons[r] for r in sorted(reasons, key=_reason_order)},
        "index_problems": len(problems),
        "plan": plan,
        "shards": shards,
        "files": files,
    }
    _write_json(out / MANIFEST, manifest)


def _reason_order(r: str):
    return (REASONS.index(r) if r in REASONS else len(REASONS), r)


def write_cache(out_dir: str | Path, features, captions, tower, *, keys: Sequence[str] | None = None,
                paths: Sequence[str] | None = None, dtype: str = "float16", shard_size: int = 2048,
                source_fingerprint: str | None = None, source: str = "precomputed features") -> "EmbeddingCache":
    """Write a cache from features computed elsewhere (in the format :func:`embed_source` writes).

    ``features``: ``(n, dim)`` or ``(n, 1 + views, dim)`` -- anything with ``len()`` and ``[a:b]``
    slicing that gives arrays (an ndarray, an ``np.memmap``, a lazy generator object); it is read
    one shard at a time, so it need not fit in memory. ``captions[i]``: image ``i``'s captions (a
    list of strings, or one string). ``tower``: the :class:`~littune.towers.image.ImageTower` (or
    spec) that the features belong to; its fingerprint, spec and preprocessing go in the manifest,
    so a trainer configured with that tower accepts the cache, and its output dim must equal
    ``dim``. ``keys`` default to ``"00000000"``, ``"00000001"``...; ``paths`` to the keys. The
    cache has no skipped images; ``source_fingerprint`` defaults to a hash of the keys.
    """
    from .towers.image import build_image_tower

    if dtype not in DTYPES:
        raise LittuneError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if shard_size < 1:
        raise LittuneError(f"shard_size must be >= 1, not {shard_size}")
    if not isinstance(tower, torch.nn.Module):
        tower = build_image_tower(tower)
    n = len(features)
    if len(captions) != n:
        raise LittuneError(f"{n} feature rows but {len(captions)} caption entries")
    if n == 0:
        raise LittuneError("no features to write")
    first = np.asarray(features[0:1])
    if first.ndim not in (2, 3):
        raise LittuneError(f"features must be (n, dim) or (n, 1 + views, dim), got rows of shape {first.shape[1:]}")
    views = first.shape[1] - 1 if first.ndim == 3 else 0
    dim = int(first.shape[-1])
    if dim != tower.dim:
        raise LittuneError(f"features are {dim}-d but the tower {tower.name} gives {tower.dim}-d outputs")
    keys = [f"{i:08d}" for i in range(n)] if keys is None else [str(k) for k in keys]
    paths = keys if paths is None else [str(p) for p in paths]
    if len(keys) != n or len(paths) != n:
        raise LittuneError(f"{n} feature rows but {len(keys)} keys and {len(paths)} paths")
    if source_fingerprint is None:
        h = hashlib.sha256()
        for k in keys:
            h.update(k.encode("utf-8") + b"\0")
        source_fingerprint = f"precomputed|{h.hexdigest()[:16]}"
    plan = {
        "format": FORMAT, "version": VERSION, "tower_fingerprint": tower.fingerprint(),
        "tower_name": getattr(tower, "name", type(tower).__name__), "tower_spec": getattr(tower, "spec", None),
        "preprocess": tower.preprocess.to_dict(), "dim": dim, "source_fingerprint": source_fingerprint,
        "source": source, "records": n, "shard_size": int(shard_size), "shards": (n + shard_size - 1) // shard_size,
        "dtype": dtype, "views": views, "seed": 0, "max_pixels": None,
    }
    phash = _plan_hash(plan)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    out = Path(os.path.expanduser(str(out_dir)))
    lock = _lock(out)
    try:
        _clear(out)
        (out / SHARD_DIR).mkdir(exist_ok=True)
        shards = []
        for s in range(plan["shards"]):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            arr = np.asarray(features[lo:hi], dtype=np.float32).reshape(hi - lo, 1 + views, dim)
            meta = _write_shard(out, s, arr, np_dtype, phash, [lo, hi], list(range(hi - lo)), [],
                                overflow="features exceed the float16 range", fix="use dtype='float32'")
            shards.append({"file": f"{SHARD_DIR}/{s:05d}.npy", "start": lo, "count": hi - lo, "records": [lo, hi],
                           "bytes": meta["bytes"], "sha256": meta["sha256"]})
        flat: list[str] = []
        counts = np.zeros(n, dtype=np.int64)
        for i in range(n):
            c = captions[i]
            c = [c] if isinstance(c, str) else list(c)
            flat.extend(c)
            counts[i] = len(c)
        _write_tables(out, plan, shards, keys, paths, flat, counts, np.arange(n, dtype=np.int64))
    finally:
        _unlock(lock)
    return EmbeddingCache.open(out, verify=False)


def summary(cache: "EmbeddingCache") -> str:
    """One line: what was embedded, what was skipped and why."""
    m = cache.manifest
    views = f", {m['views']} augmented views" if m["views"] else ""
    line = f"embedded {m['count']:,} images ({m['dim']}-d {m['dtype']}{views}) into {cache.directory}"
    n_skip = m["skipped"] + m.get("index_problems", 0)
    if n_skip:
        parts = [f"{n} {r}" for r, n in m["skipped_by_reason"].items()]
        if m.get("index_problems"):
            parts.append(f"{m['index_problems']} index problem{'s' if m['index_problems'] != 1 else ''}")
        line += f"; skipped {n_skip:,}: {', '.join(parts)} (see {cache.directory / SKIPPED})"
    else:
        line += "; nothing skipped"
    return line


# ---------------------------------------------------------------------------------------------
def default_max_open() -> int:
    """Shard files a reader keeps open: a quarter of the open-file limit, between 16 and 1024.

    Random batches touch most shards at every step; a shard that is not open costs an ``open()``
    (1024 open shards of the default 2048 rows cover a 2M-image cache)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 128
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


class _File:
    """A file read with positional reads (``pread``), never memory-mapped.

    Reading rows through ``pread`` instead of a memory map keeps the process's memory flat: pages of
    a mapped file that has been touched count in its resident set (and the kernel maps 64 KB around
    every page fault), so random rows from a large cache would grow RSS up to the cache's size over
    an epoch. With ``pread`` only the page cache holds them, which belongs to no process.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self.fd).st_size

    def read_into(self, buf: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous array ``buf`` with the bytes at ``offset``."""
        view = memoryview(buf).cast("B")
        n = _read_at(self.fd, view, offset)
        while 0 < n < len(view):  # short reads are legal; a 0 means the file ended early
            view, offset = view[n:], offset + n
            n = _read_at(self.fd, view, offset)
        if n <= 0 and len(view):
            raise LittuneError(f"{self.path} is shorter than its manifest says: re-run `littune embed`")

    def read(self, offset: int, nbytes: int) -> bytes:
        data = _pread(self.fd, nbytes, offset) if nbytes else b""
        if len(data) < nbytes:  # a short read (legal, rare): finish it
            buf = np.empty(nbytes, dtype=np.uint8)
            self.read_into(buf, offset)
            data = buf.tobytes()
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __getstate__(self) -> dict:  # pickled (e.g. to a spawned process): the copy opens its own file
        return {**self.__dict__, "fd": -1, "_was_open": self.fd >= 0}

    def __setstate__(self, state: dict) -> None:
        was_open = state.pop("_was_open", False)
        self.__dict__.update(state)
        if was_open:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


if hasattr(os, "preadv"):
    _pread = os.pread

    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)
else:  # pragma: no cover - Windows: seek + read under a lock
    import threading

    _SEEK_LOCK = threading.Lock()

    def _pread(fd: int, nbytes: int, offset: int) -> bytes:
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, nbytes)

    def _read_at(fd: int, view: memoryview, offset: int) -> int:
        data = _pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)


_PAIRS = {"<i8": struct.Struct("<qq"), ">i8": struct.Struct(">qq")}


class _Npy(_File):
    """A C-order ``.npy`` array read by rows (first axis) with ``pread``."""

    def __init__(self, path: Path):
        super().__init__(path)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            offset = f.tell()
        if fortran and len(shape) > 1:
            raise LittuneError(f"{path} is stored in Fortran order; littune writes C order")
        self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.shape and self.size < self.offset + self.shape[0] * self.row_bytes:
            raise LittuneError(f"{path} is shorter than its header says")
        self._pair = self.dtype.str if self.dtype.str in _PAIRS else None  # an int64 offsets table

    def reopen(self) -> "_Npy":
        """The same file, opened again (header already parsed and checked): one ``open()``."""
        f = object.__new__(type(self))
        f.__dict__.update(self.__dict__)
        f.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return f

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` (``0 <= lo <= hi <= len``), read into ``out`` when given."""
        if out is None:
            out = np.empty((hi - lo,) + self.shape[1:], dtype=self.dtype)
        if hi > lo:
            self.read_into(out, self.offset + lo * self.row_bytes)
        return out

    def pair(self, i: int) -> tuple[int, int]:
        """Elements ``i`` and ``i + 1`` of a 1-D int64 array (an offsets table), as ints."""
        if self._pair is not None:  # one pread + struct (no numpy array for two numbers)
            return _PAIRS[self._pair].unpack(self.read(self.offset + i * 8, 16))
        a, b = self.rows(i, i + 2)
        return int(a), int(b)


class _Strings:
    """A UTF-8 blob + int64 offsets, read with ``pread``."""

    def __init__(self, blob: Path, offsets: Path):
        self.offsets = _Npy(offsets)
        self.blob = _File(blob)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = self.offsets.pair(i)
        return self.blob.read(a, b - a).decode("utf-8")

    def range(self, lo: int, hi: int) -> list[str]:
        """Strings ``lo:hi`` with two reads."""
        off = self.offsets.rows(lo, hi + 1)
        base = int(off[0])
        data = self.blob.read(base, int(off[-1]) - base)
        cut = (off - base).tolist()
        return [data[cut[k]:cut[k + 1]].decode("utf-8") for k in range(hi - lo)]


class EmbeddingCache:
    """Read a cache written by :func:`embed_source`: features by index, captions, keys.

    Everything is read with positional reads (``pread``) from at most ``max_open`` open shard files:
    the process's memory stays the same whatever the cache's size and however long it is read.
    """

    def __init__(self, directory: str | Path, manifest: dict, max_open: int | None = None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.dtype: str = manifest["dtype"]
        self.views: int = int(manifest["views"])
        self.tower_fingerprint: str = manifest["tower_fingerprint"]
        self.source_fingerprint: str = manifest["source_fingerprint"]
        self._count = int(manifest["count"])
        self._shards = [s for s in manifest["shards"] if s["count"] > 0]
        self._starts = np.asarray([s["start"] for s in self._shards], dtype=np.int64)
        self._open: OrderedDict[int, _Npy] = OrderedDict()
        self._known: dict[int, _Npy] = {}  # shards opened before (a few hundred bytes each)
        self.max_open = max(1, int(default_max_open() if max_open is None else max_open))
        d = self.directory
        self._keys = _Strings(d / "keys.utf8", d / "key_offsets.npy")
        self._paths = _Strings(d / "paths.utf8", d / "path_offsets.npy")
        self._captions = _Strings(d / "captions.utf8", d / "caption_offsets.npy")
        self._image_captions = _Npy(d / "image_captions.npy")

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True, max_open: int | None = None) -> "EmbeddingCache":
        """Open a cache; ``verify`` checks every file's sha256 against the manifest (reads it all once).
        ``max_open``: shard files kept open (default :func:`default_max_open`)."""
        d = Path(os.path.expanduser(str(directory)))
        mf = d / MANIFEST
        if not mf.is_file():
            hint = " (an interrupted `littune embed`: run it again to finish)" if (d / PLAN).exists() else ""
            raise LittuneError(f"{d} is not an embedding cache: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(mf.read_text())
        except ValueError as e:
            raise LittuneError(f"{mf} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise LittuneError(f"{mf} is not a littune embedding cache manifest")
        if manifest.get("version", 0) > VERSION:
            raise LittuneError(f"{d} was written by a newer littune (cache format {manifest['version']})")
        for s in manifest["shards"]:
            p = d / s["file"]
            if not p.is_file():
                raise LittuneError(f"embedding cache {d} is incomplete: {s['file']} is missing")
            if p.stat().st_size != s["bytes"] or (verify and _sha256(p) != s["sha256"]):
                raise LittuneError(f"embedding cache {d} is corrupt: {s['file']} does not match its checksum; "
                                   "re-run `littune embed` (it redoes only the damaged shards)")
        for name, digest in manifest.get("files", {}).items():
            p = d / name
            if not p.is_file() or (verify and _sha256(p) != digest):
                raise LittuneError(f"embedding cache {d} is corrupt: {name} is missing or does not match its checksum")
        return cls(d, manifest, max_open=max_open)

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.directory)!r}, {self._count} images, {self.dim}-d {self.dtype}, "
                f"views={self.views})")

    # -- features --------------------------------------------------------------------------------
    def _shard(self, j: int) -> _Npy:
        f = self._open.get(j)
        if f is None:
            # Reopening a shard is one open(): its header is parsed and checked the first time only.
            known = self._known.get(j)
            if known is not None:
                f = known.reopen()
            else:
                f = _Npy(self.directory / self._shards[j]["file"])
                want = (self._shards[j]["count"], 1 + self.views, self.dim)
                if f.shape != want or f.dtype != np.dtype(self.dtype):
                    f.close()
                    raise LittuneError(f"{f.path} holds {f.dtype}{list(f.shape)}, the manifest says "
                                       f"{self.dtype}{list(want)}: re-run `littune embed`")
                self._known[j] = f
            self._open[j] = f
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(j)
        return f

    def features(self, indices: Sequence[int] | np.ndarray, view: int | np.ndarray | None = None) -> np.ndarray:
        """``(n, dim)`` float32 features of images ``indices``: the eval view (``view=None``), or
        augmented view ``view`` (an int, or one per row; 0-based, ``< views``).

        Rows are read in index order, one read per run of consecutive images (a random batch: one
        small read per row; a range: one read per shard)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self._count or idx.max() >= self._count):
            bad = idx[(idx < -self._count) | (idx >= self._count)][0]
            raise IndexError(f"image index {bad} out of range for a cache of {self._count} images")
        idx = np.where(idx < 0, idx + self._count, idx)
        if view is None:
            slot = np.zeros(len(idx), dtype=np.int64)
        else:
            v = np.asarray(view, dtype=np.int64)
            if v.ndim == 0:
                v = np.full(len(idx), int(v), dtype=np.int64)
            elif v.shape != idx.shape:
                raise ValueError(f"view has shape {v.shape}; give one view per index ({idx.shape})")
            if v.size and (v.min() < 0 or v.max() >= self.views):
                raise IndexError(f"view {int(v.max() if v.max() >= self.views else v.min())} out of range: "
                                 f"this cache stores {self.views} augmented view(s)"
                                 + (" (embed with --views K)" if self.views == 0 else ""))
            slot = v + 1
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        if not len(idx):
            return out
        order = np.argsort(idx, kind="stable")
        sidx, sslot = idx[order], slot[order]
        which = np.searchsorted(self._starts, sidx, side="right") - 1
        # runs of consecutive images within one shard
        cuts = np.flatnonzero((np.diff(sidx) != 1) | (np.diff(which) != 0)) + 1
        bounds = np.concatenate([[0], cuts, [len(sidx)]]).tolist()
        local = (sidx - self._starts[which]).tolist()
        which_l, slot_l = which.tolist(), sslot.tolist()
        stored = np.empty((len(idx), self.dim), dtype=np.dtype(self.dtype))
        for a, b in zip(bounds[:-1], bounds[1:]):
            f = self._shard(which_l[a])
            if b - a == 1:  # one row: read just its slot
                f.read_into(stored[a], f.offset + (local[a] * (1 + self.views) + slot_l[a]) * self.dim * f.dtype.itemsize)
            elif self.views == 0:
                f.rows(local[a], local[a] + b - a, out=stored[a:b].reshape(b - a, 1, self.dim))
            else:
                block = f.rows(local[a], local[a] + b - a)
                stored[a:b] = block[np.arange(b - a), sslot[a:b]]
        out[order] = stored
        return out

    # -- metadata ----------------------------------------------------------------------------------
    def captions(self, i: int) -> list[str]:
        """All captions of image ``i``."""
        a, b = self._image_captions.pair(self._check(i))
        return self._captions.range(a, b)

    def sample_captions(self, indices: Sequence[int] | np.ndarray, choice: Sequence[int] | np.ndarray) -> list[str]:
        """One caption per image: caption ``choice[k] % count`` of image ``indices[k]`` ("" if it has none)."""
        out = []
        for i, r in zip(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(choice, dtype=np.int64).tolist()):
            a, b = self._image_captions.pair(self._check(i))
            out.append(self._captions[a + r % (b - a)] if b > a else "")
        return out

    def iter_captions(self, chunk: int = 65536):
        """Every caption of every image, in order (read in chunks of ``chunk`` captions)."""
        n = len(self._captions)
        for lo in range(0, n, chunk):
            yield from self._captions.range(lo, min(n, lo + chunk))

    def key(self, i: int) -> str:
        """The image's key in its source (e.g. its relative path)."""
        return self._keys[self._check(i)]

    def path(self, i: int) -> str:
        """Where the image was read from (a file, or ``shard.tar:key``)."""
        return self._paths[self._check(i)]

    def source_index(self, i: int) -> int:
        """Position of image ``i`` among the source's records (bad images leave gaps)."""
        if not hasattr(self, "_source_index"):
            self._source_index = _Npy(self.directory / "source_index.npy")
        i = self._check(i)
        return int(self._source_index.rows(i, i + 1)[0])

    def skipped(self) -> list[tuple[str, str, str]]:
        """The report: ``(where, reason, detail)`` of every image (or index row) that was skipped."""
        p = self.directory / SKIPPED
        if not p.is_file():
            return []
        rows = p.read_text(encoding="utf-8").splitlines()[1:]
        return [tuple((r.split("\t") + ["", "", ""])[:3]) for r in rows if r]

    def _check(self, i: int) -> int:
        i = int(i)
        if not -self._count <= i < self._count:
            raise IndexError(f"image index {i} out of range for a cache of {self._count} images")
        return i % self._count

    def check(self, tower_fingerprint: str | None = None, source_fingerprint: str | None = None) -> None:
        """Raise :class:`~littune.errors.StaleCacheError` if the cache was built with another tower or
        source than the configuration's (the message names the expected and the found fingerprint)."""
        problems = []
        if tower_fingerprint is not None and tower_fingerprint != self.tower_fingerprint:
            problems.append(f"image tower fingerprint: configuration {tower_fingerprint}, "
                            f"cache {self.tower_fingerprint}")
        if source_fingerprint is not None and source_fingerprint != self.source_fingerprint:
            problems.append(f"source fingerprint: configuration {source_fingerprint}, cache {self.source_fingerprint}")
        if problems:
            raise StaleCacheError(
                f"embedding cache {self.directory} is stale ({'; '.join(problems)}): it was built from "
                f"{self.manifest.get('source')} with {self.manifest.get('tower_name')}; re-run `littune embed` "
                "with the configured tower and source, or point the configuration at the matching cache")
