"""Decoding in worker processes, and the speed defaults of ``littune embed``.

Workers decode, resize and crop records (the eval view, then ``views`` augmented views whose random
stream depends only on the seed, the image key and the view number) and ship uint8 pixels, four
records to a chunk, so one small tensor per chunk crosses the process boundary (a quarter of the
float32 bytes); the forward lanes normalise a whole batch at once (:meth:`Preprocess.normalize`,
bit-identical to normalising each image in the worker). The defaults below size the workers, the batch,
the forward lanes and their threads to the machine.
"""

from __future__ import annotations

import os
import random
from typing import Iterator

import torch

from ..data.decode import BadImage
from ..errors import LittuneError
from .lock import close_inherited_locks

#: niceness added to decoding workers, so that the tower's threads win the cores when both want them
WORKER_NICE = 0
#: records decoded per worker task (one shared-memory tensor per chunk)
CHUNK = 4


def _cores() -> int:
    """The cores this process may use: the CPUs it may run on, shared out among the local ranks of a
    torchrun (``LOCAL_WORLD_SIZE``), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // _env_int("LOCAL_WORLD_SIZE", 1))


def _env_int(name: str, default: int) -> int:
    """A positive integer environment variable, or ``default`` when it is unset or not one."""
    text = os.environ.get(name, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else default


def default_workers() -> int:
    """Decoding worker processes: one per two cores, at least 1, at most 6 (so 1 on 2 cores).

    The locked tower's forward costs about as much core time per image as decoding and resizing it
    or more (EfficientNet-Lite0 on onnxruntime ~12 ms; a 200-640 px photo ~11 ms exact, less with
    fast decoding; a 256 px one ~3 ms), so decoding needs at most half the cores. On 2 cores the one
    worker takes a core while the two single-threaded forward lanes take the other, and both cores
    whenever the worker is ahead and sleeps (a batch of decoded images waiting).
    """
    return max(1, min(6, _cores() // 2))


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
    """torch (and onnxruntime) intra-op threads per lane, so that lanes x threads + workers stays within
    the cores (never less than one thread a lane): the cores left after the decoding workers, shared
    by the lanes. ``OMP_NUM_THREADS`` (torchrun sets it) is the compute threads this process may use
    in all, shared by the lanes likewise."""
    budget = _env_int("OMP_NUM_THREADS", 0) or _cores() - workers
    return max(1, budget // max(1, lanes))


def training_threads(workers: int = 0) -> int:
    """torch intra-op threads for training (``littune train --threads``' default): the cores this process
    may use, less the ``workers`` decoding processes of the on-the-fly path (0 from a cache), at least 1;
    ``OMP_NUM_THREADS`` (torchrun sets it) when set. Every core, not one fewer: OpenMP threads wait
    passively (``littune/__init__``), so a core taken by another process slows its thread's share of each
    operator: from a cache on 2 cores beside a one-core hog, 2 threads train about as fast as 1, and up to
    1.5x faster than 1 when the cores are free (``benchmarks/train_throughput.py``, its loaded part). Besides
    them training runs one thread that makes the next batch (the cache path) or the decoding workers."""
    return default_threads(workers, 1)


def augment_rng(seed: int, key: str, view: int) -> random.Random:
    """The random stream of augmented view ``view`` of image ``key`` (independent of order and rank)."""
    return random.Random(f"littune-view|{seed}|{key}|{view}")


class _Decode(torch.utils.data.Dataset):
    """Decode, resize and crop one record to uint8: eval view, then ``views`` augmented views (seeded by key)."""

    def __init__(self, records, order: list[int], preprocess, views: int, seed: int, max_pixels: int | None):
        self.records, self.order = records, order
        self.preprocess, self.views, self.seed, self.max_pixels = preprocess, views, seed, max_pixels

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        i = self.order[j]
        rec = self.records[i]
        try:
            # fast decoding drafts a JPEG for the eval view alone: augmented crops keep full resolution
            img = rec.open(max_pixels=self.max_pixels, reduce_to=None if self.views else self.preprocess.draft_to,
                           render_to=self.preprocess.resize_to)
            px = [self.preprocess.eval_uint8(img)]
            for v in range(self.views):
                px.append(self.preprocess.train_uint8(img, augment_rng(self.seed, rec.key, v)))
        except BadImage as e:
            return i, None, (rec.where, e.reason, e.detail)
        except Exception as e:  # never let one file stop a run
            return i, None, (rec.where, "corrupt", f"{type(e).__name__}: {e}")
        return i, (px[0].unsqueeze(0) if len(px) == 1 else torch.stack(px)), None


def _collate(items: list) -> tuple[list, torch.Tensor | None]:
    """A chunk of decoded records -> ``([(index, bad or None)], pixels of the good ones)``."""
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


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a worker is one core's worth of decoding (the DataLoader sets it too)
    close_inherited_locks()
    if WORKER_NICE:
        try:
            os.nice(WORKER_NICE)
        except OSError:
            pass


def decoded(records, order: list[int], preprocess, plan: dict, batch_size: int,
            workers: int) -> Iterator[tuple[int, torch.Tensor | None, tuple | None]]:
    """``(index, uint8 pixels (1 + views, 3, S, S) or None, (where, reason, detail) or None)`` for each
    record of ``order``, in that order, decoded by ``workers`` processes (0: in this one)."""
    dataset = _Decode(records, order, preprocess, plan["views"], plan["seed"], plan["max_pixels"])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=CHUNK, shuffle=False, num_workers=workers, collate_fn=_collate,
        # about one batch of decoded images waiting, whatever the number of workers
        prefetch_factor=max(2, -(-batch_size // (CHUNK * workers))) if workers else None,
        persistent_workers=False, pin_memory=False,
        worker_init_fn=_worker_init if workers else None)
    it = iter(loader)
    try:
        while True:
            try:
                chunk = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if workers and ("shared memory" in str(e) or "shm" in str(e)):
                    raise LittuneError(f"decoding workers ran out of shared memory ({e}); use --workers 0, or give "
                                       "the container more /dev/shm (docker run --shm-size 1g)") from None
                raise
            yield from _unchunk(chunk)
    finally:
        del it  # stops the worker processes
