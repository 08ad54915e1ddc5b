"""Embedding throughput: the whole ``littune embed`` pipeline against the bare tower forward.

Makes ``--images`` real image files (random crops and resizes of ``tests/data/chelsea.jpg`` and
``coffee.jpg``, shorter side 200-640 px, 3/4 JPEG and 1/4 PNG) in a temporary folder with a CSV of
captions. It then times, in interleaved rounds (``--repeat``; the best round of each counts, so a
busy neighbour on a shared machine hurts all alike):

* the **bare forward**: the tower on ready, preprocessed tensors in batches of ``--batch-size`` under
  ``torch.inference_mode()`` -- no file reading, decoding or resizing -- twice: as a plain loop with
  torch's default threads (what ``tower(x)`` gets), and on the same forward lanes and threads as the
  pipeline (two single-threaded forwards at once on 2 cores); the faster one is the reference;
* the **pipeline**: :func:`littune.cache.embed_source` over the CSV, from opening the files to the
  finished cache on disk (decoding in worker processes overlapped with the forward, shard writes,
  checksums, manifest),

and prints images/s of each and the ratio pipeline / best bare forward (target >= 0.85 with
EfficientNet-Lite0 on 2 cores). Run from the repository root:

    python benchmarks/embed_throughput.py                        # efficientnet-lite0, 512 images
    python benchmarks/embed_throughput.py --batch-size 64 --lanes 1 --threads 2   # torch's usual way
    python benchmarks/embed_throughput.py --tower tiny --images 2000   # the decode-bound extreme
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from littune.cache import _cores, default_batch_size, default_lanes, default_threads, default_workers, embed_source
from littune.data.decode import load_image
from littune.data.sources import open_source
from littune.towers.image import build_image_tower

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def make_images(directory: Path, n: int, seed: int = 0) -> Path:
    """``n`` random crops/resizes of the two test photos, as JPEG and PNG, and a CSV listing them."""
    rng = random.Random(seed)
    bases = [Image.open(DATA / "chelsea.jpg").convert("RGB"), Image.open(DATA / "coffee.jpg").convert("RGB")]
    rows = []
    for i in range(n):
        img = bases[i % 2]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        short = rng.randint(200, 640)
        s = short / min(crop.size)
        crop = crop.resize((max(1, round(crop.width * s)), max(1, round(crop.height * s))), Image.Resampling.BICUBIC)
        name = f"img{i:05d}." + ("png" if i % 4 == 3 else "jpg")
        if name.endswith(".png"):
            crop.save(directory / name)
        else:
            crop.save(directory / name, quality=90)
        rows.append((name, ["a cat", "a cup of coffee"][i % 2]))
    with open(directory / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return directory / "pairs.csv"


def bare_forward(tower, pixels: torch.Tensor, batch_size: int, lanes: int = 1, threads: int | None = None) -> float:
    """Images per second of the tower alone on ready tensors (``lanes`` batches at a time)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def fwd(x):
        with torch.inference_mode():
            return tower(x)

    batches = [pixels[s:s + batch_size] for s in range(0, len(pixels), batch_size)]
    try:
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(fwd, [pixels[:8]] * lanes))  # warm-up
            t = time.perf_counter()
            list(pool.map(fwd, batches))
            return len(pixels) / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tower", default="efficientnet-lite0", help="tower spec, or 'tiny' for the test tower")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=default_batch_size(), help="default: littune's (16 on a CPU)")
    p.add_argument("--workers", type=int, default=None, help=f"decoding workers (default {default_workers()})")
    p.add_argument("--lanes", type=int, default=None, help=f"concurrent forwards (default {default_lanes()})")
    p.add_argument("--threads", type=int, default=None, help="torch threads per lane (default: littune's choice)")
    p.add_argument("--views", type=int, default=0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best of each measurement counts")
    p.add_argument("--dir", help="keep the images (and reuse them) here instead of a temporary folder")
    args = p.parse_args(argv)
    workers = default_workers() if args.workers is None else args.workers
    lanes = default_lanes() if args.lanes is None else args.lanes
    threads = default_threads(workers, lanes) if args.threads is None else args.threads
    default_torch_threads = torch.get_num_threads()

    if args.tower == "tiny":
        from littune.towers.tiny import SPEC

        spec = SPEC
    else:
        spec = args.tower
    tower = build_image_tower(spec).eval()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="littune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        csv_path = work / "pairs.csv"
        if not (args.dir and csv_path.exists() and len(open_source(csv_path)) == args.images):
            csv_path = make_images(work, args.images)
            print(f"made {args.images} images in {time.perf_counter() - t:.1f}s under {work}", file=sys.stderr)
        source = open_source(csv_path)
        pixels = torch.stack([tower.preprocess.eval(load_image(r.path)) for r in source.records()])

        plain, laned, pipe = [], [], []
        for r in range(args.repeat):
            plain.append(bare_forward(tower, pixels, args.batch_size))
            laned.append(bare_forward(tower, pixels, args.batch_size, lanes, threads))
            t = time.perf_counter()
            cache = embed_source(source, tower, work / "cache", dtype=args.dtype, views=args.views,
                                 batch_size=args.batch_size, workers=workers, lanes=lanes, threads=threads,
                                 resume=False, progress=False)
            pipe.append(args.images / (time.perf_counter() - t))
            assert len(cache) == args.images, (len(cache), args.images)
            print(f"  round {r + 1}: bare {plain[-1]:.1f} | bare on lanes {laned[-1]:.1f} | pipeline {pipe[-1]:.1f} "
                  "images/s", file=sys.stderr)
        best_bare = max(max(plain), max(laned))
        # With K views the pipeline runs 1 + K forwards per image: compare per forward.
        ratio = max(pipe) * (1 + args.views) / best_bare
        print(f"tower {tower.name}, {args.images} images (JPEG+PNG, 200-640 px), batch {args.batch_size}, "
              f"{_cores()} cores, best of {args.repeat} rounds")
        print(f"bare forward, plain loop ({default_torch_threads} torch threads)        : {max(plain):7.1f} images/s")
        print(f"bare forward, {lanes} lane(s) x {threads} thread(s)                   : {max(laned):7.1f} images/s")
        print(f"embed pipeline, files -> cache ({workers} decoding worker(s), same lanes): {max(pipe):7.1f} images/s"
              + (f" ({1 + args.views} forwards per image)" if args.views else ""))
        print(f"ratio pipeline / best bare forward                     : {ratio:7.3f}  (target >= 0.85)")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
