"""The shard loop: decoded images -> forward lanes -> shard files, written in order as they finish.

Records are decoded in order (see :mod:`.workers`); each shard's good images are cut into batches
that never cross a shard boundary (so a shard's bytes do not depend on what ran before it) and each
batch goes to one of ``lanes`` forward threads. A shard is written as soon as all its batches are
done and every shard before it is written.
"""

from __future__ import annotations

import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .format import write_shard
from .workers import decoded

Forward = Callable[[torch.Tensor], np.ndarray]


class _Now:
    """A finished computation with the interface of a Future (the one-lane case)."""

    def __init__(self, value):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self):
        return self.value


class Lanes:
    """Run ``forward`` on ``lanes`` threads (in the caller's thread for one lane), with at most
    ``2 * lanes`` batches in flight; ``after`` runs after each submission."""

    def __init__(self, forward: Forward, lanes: int, after: Callable[[], None]):
        self.forward, self.lanes, self.after = forward, lanes, after
        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="littune-embed") if lanes > 1 else None
        self.inflight: deque = deque()  # jobs not yet known to be finished (bounded: memory)

    def _run(self, pixels: list[torch.Tensor]) -> np.ndarray:
        return self.forward(torch.cat(pixels) if len(pixels) > 1 else pixels[0])

    def submit(self, pixels: list[torch.Tensor]):
        fut = self.pool.submit(self._run, pixels) if self.pool else _Now(self._run(pixels))
        self.inflight.append(fut)
        while len(self.inflight) > 2 * self.lanes:
            self.inflight.popleft().result()
        self.after()  # a finished shard goes to disk now, not after the next one
        return fut

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Shard:
    """A shard whose records are all decoded: its good rows, its skipped ones, its forward jobs."""

    shard: int
    lo: int
    hi: int
    good: list[int] = field(default_factory=list)
    skipped: list[list] = field(default_factory=list)
    jobs: list = field(default_factory=list)
    copied: list[int] = field(default_factory=list)  # positions in ``good`` of the rows copied from other caches


class _Writer:
    """Shards waiting for their forward jobs, written in order (with the rows ``reuse`` copies in their places)."""

    def __init__(self, out: Path, plan: dict, phash: str, runtime: str | None, reuse=None):
        self.out, self.phash, self.views, self.dim = out, phash, plan["views"], plan["dim"]
        self.runtime, self.reuse = runtime, reuse
        self.np_dtype = np.float16 if plan["dtype"] == "float16" else np.float32
        self.tokens = plan.get("tokens")  # the token spec (deciding fields), None without tokens
        self.queue: deque[_Shard] = deque()

    def write_ready(self, block: bool = False) -> None:
        while self.queue and (block or all(f.done() for f in self.queue[0].jobs)):
            job = self.queue.popleft()
            results = [f.result() for f in job.jobs]
            feats = [r[0] for r in results] if self.tokens else results
            arr = np.concatenate(feats) if feats else np.zeros((0, self.dim), np.float32)
            arr = arr.reshape(len(job.good) - len(job.copied), 1 + self.views, self.dim)
            toks = self._tokens(len(job.good) - len(job.copied), [r[1] for r in results]) if self.tokens else None
            if job.copied:
                arr, toks = self._with_copied(job, arr, toks)
            meta = write_shard(self.out, job.shard, arr, self.np_dtype, self.phash, [job.lo, job.hi], job.good,
                               job.skipped, overflow="tower features exceed the float16 range",
                               fix="use --dtype float32", runtime=self.runtime, tokens=toks)
            if self.reuse is not None:
                self.reuse.written(job.shard, meta, job.lo)

    def _tokens(self, n: int, parts: list[np.ndarray]) -> np.ndarray:
        """The computed rows' tokens ``(n, h*w, F)`` float32."""
        h, w = self.tokens["grid"]
        return np.concatenate(parts) if parts else np.zeros((n, h * w, self.tokens["dim"]), np.float32)

    def _with_copied(self, job: _Shard, computed: np.ndarray, tokens: np.ndarray | None):
        """The shard's rows (and tokens) in order: the computed ones, and the copied ones in their places."""
        arr = np.empty((len(job.good), 1 + self.views, self.dim), dtype=np.float32)
        mine = np.ones(len(job.good), dtype=bool)
        mine[job.copied] = False
        arr[mine] = computed
        offsets = [job.good[p] for p in job.copied]
        arr[job.copied] = self.reuse.rows(job.shard, offsets)
        if tokens is not None:
            full = np.empty((len(job.good), *tokens.shape[1:]), dtype=np.float32)
            full[mine] = tokens
            full[job.copied] = self.reuse.token_rows(job.shard, offsets)
            tokens = full
        return arr, tokens


def _embed_shard(job: _Shard, items, lanes: Lanes, per_batch: int, bar, copy: frozenset = frozenset()) -> _Shard:
    """Take the shard's records from ``items`` and submit its good images in batches of ``per_batch``; the
    images at the offsets ``copy`` are not in ``items``: their rows are copied."""
    pending: list[torch.Tensor] = []  # (1 + views, 3, S, S) per good image, in order
    for offset in range(job.hi - job.lo):
        if offset in copy:
            job.copied.append(len(job.good))
            job.good.append(offset)
            bar.update(1)
            continue
        i, px, bad = next(items)
        if px is None:
            job.skipped.append(list(bad))
            bar.skipped += 1
            bar.set_postfix(skipped=bar.skipped, refresh=False)
        else:
            job.good.append(i - job.lo)
            pending.append(px)
            if len(pending) == per_batch:
                job.jobs.append(lanes.submit(pending))
                pending = []
        bar.update(1)
    if pending:
        job.jobs.append(lanes.submit(pending))
    return job


def _progress(total: int, done: int, show: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="img", desc="embed", disable=not show, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.05)
    bar.skipped = 0
    return bar


def _nothing():
    yield from ()


def run_shards(out: Path, records, todo: list[int], forward: Forward, preprocess, plan: dict, phash: str, *,
               batch_size: int, workers: int, lanes: int, progress: bool, done: int, total: int, reuse=None) -> None:
    """Decode the records of shards ``todo`` (worker processes), embed them batch by batch on
    ``lanes`` concurrent calls of ``forward`` (each normalising its uint8 batch first), and write each shard, in
    order, once its batches are done. ``reuse`` (a :class:`.reuse.RunReuse`): the images whose rows are copied
    from other caches instead (neither decoded nor embedded)."""
    size, n = plan["shard_size"], len(records)
    spans = [(s, s * size, min(n, (s + 1) * size)) for s in todo]

    def copied(s: int) -> frozenset:  # made again where needed: no set of every copied image is kept
        return reuse.skip(s) if reuse is not None else frozenset()

    order = [i for s, lo, hi in spans for skip in (copied(s),) for i in range(lo, hi) if i - lo not in skip]
    items = decoded(records, order, preprocess, plan, batch_size, workers) if order else _nothing()
    writer = _Writer(out, plan, phash, getattr(forward, "runtime", None), reuse)
    pool = Lanes(lambda px: forward(preprocess.normalize(px)), lanes, after=writer.write_ready)
    bar = _progress(total, done, progress)
    per_batch = max(1, batch_size // (1 + plan["views"]))
    try:
        for s, lo, hi in spans:
            writer.queue.append(_embed_shard(_Shard(s, lo, hi), items, pool, per_batch, bar, copied(s)))
            writer.write_ready()
        writer.write_ready(block=True)
    finally:
        bar.close()
        items.close()
        pool.close()
