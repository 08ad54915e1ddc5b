"""Search speed: littune's chunked exact top-k against one bare ``torch.topk(q @ db.T)``.

The database is ``--rows`` x ``--dim`` random unit vectors stored as float16 (what an index holds);
the baseline gets a float32 copy of the same array, the fastest case for it (no conversion, one
matmul, one top-k). Both run ``--queries`` queries for the top ``-k``; each is timed ``--repeat``
times after a warm-up, the contenders' runs interleaved so that a change in machine load hits both,
and the medians are reported with the ratio littune / bare (target <= 1.2) and a check that both
return the same items. A last line times the search as ``littune search`` runs it: on the index's
``embeddings.npy`` memory-mapped from disk (warm page cache; ``--no-mmap`` skips it).

    python benchmarks/search_speed.py                      # 1M x 512, 100 queries, top-10
    python benchmarks/search_speed.py --rows 200000 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from littune.search import DEFAULT_CHUNK_ROWS, topk_search


def _time(fns, repeat: int) -> list[tuple[float, object]]:
    """Median time and last output of each function; the runs are interleaved (a, b, a, b...) so
    that a change in machine load affects every contender alike."""
    outs = [fn() for fn in fns]  # warm-up (page faults, thread pool start)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            outs[j] = fn()
            times[j].append(time.perf_counter() - t)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-mmap", action="store_true", help="skip the memory-mapped index file timing")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    db16 = np.empty((args.rows, args.dim), dtype=np.float16)
    for s in range(0, args.rows, 100_000):  # build in blocks to keep peak memory low
        block = rng.standard_normal((min(100_000, args.rows - s), args.dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        db16[s:s + len(block)] = block
    db32 = torch.from_numpy(db16.astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    q = torch.nn.functional.normalize(q, dim=1)

    def bare():
        return torch.topk(q @ db32.T, args.k, dim=1)

    def ours():
        return topk_search(q, db16, k=args.k, chunk_rows=args.chunk_rows)

    (t_bare, (bv, bi)), (t_ours, (ov, oi)) = _time([bare, ours], args.repeat)
    same = all(set(a) == set(b) for a, b in zip(bi.tolist(), oi.tolist()))
    max_diff = float((bv.sort(dim=1, descending=True).values - ov).abs().max())
    gb16 = db16.nbytes / 2**30
    print(f"database: {args.rows:,} x {args.dim} float16 ({gb16:.2f} GiB); {args.queries} queries, top-{args.k}; "
          f"{torch.get_num_threads()} torch threads; chunk {args.chunk_rows:,} rows")
    print(f"bare torch.topk(q @ db.T) on a float32 copy : {t_bare * 1000:8.1f} ms")
    print(f"littune topk_search on the float16 array    : {t_ours * 1000:8.1f} ms")
    print(f"ratio littune / bare                        : {t_ours / t_bare:8.3f}  (target <= 1.2)")
    if not args.no_mmap:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "embeddings.npy"
            np.save(path, db16, allow_pickle=False)
            mm = np.load(path, mmap_mode="r")
            (t_mm, (mv, mi)), (t_bare2, _) = _time(
                [lambda: topk_search(q, mm, k=args.k, chunk_rows=args.chunk_rows), bare], args.repeat)
            same = same and bool((mi == oi).all())
            del mm
        print(f"littune topk_search on a memory-mapped .npy  : {t_mm * 1000:8.1f} ms  "
              f"(ratio {t_mm / t_bare2:.3f} against bare {t_bare2 * 1000:.1f} ms in the same rounds)")
    print(f"same top-{args.k} sets: {same}; max score difference {max_diff:.2e}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
