"""Embedding throughput: the whole ``littune embed`` pipeline on each runtime, against the bare forward.

Makes ``--images`` real image files (random crops and resizes of ``tests/data/chelsea.jpg`` and
``coffee.jpg``, shorter side 200-640 px by default, 3/4 JPEG and 1/4 PNG) in a temporary folder with a CSV of
captions. It prints what one image costs to decode and to resize/crop (one core, milliseconds), then
times, in interleaved rounds (``--repeat``; the best round of each counts, so a busy neighbour on a
shared machine hurts all alike):

* the **bare forward** of each runtime: the tower on ready, preprocessed tensors in batches of
  ``--batch-size`` on the pipeline's forward lanes and threads -- no file reading, decoding or
  resizing; for torch also as a plain loop with torch's default threads (``tower(x)``, eager);
* the **pipeline** on each runtime: :func:`littune.cache.embed_source` over the CSV, from opening the
  files to the finished cache on disk (decoding in worker processes overlapped with the forward,
  shard writes, checksums, manifest), with ``runtime="auto"`` (onnxruntime on a CPU, torch with
  autocast and channels_last on CUDA) and with ``runtime="torch"``.

It ends with ``result:`` lines: ``embed_speedup_vs_torch_eager`` (pipeline on the chosen runtime /
pipeline with ``--runtime torch``; target >= 2.5 on a CPU) and ``embed_pipeline_vs_bare`` (pipeline /
the chosen runtime's bare forward; target >= 0.85). Run from the repository root:

    python benchmarks/embed_throughput.py                        # efficientnet-lite0, 512 images
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
from littune.runtime import open_runner
from littune.towers.image import build_image_tower

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def make_images(directory: Path, n: int, seed: int = 0, short_side: tuple[int, int] = (200, 640)) -> Path:
    """``n`` random crops/resizes of the two test photos (shorter side drawn from ``short_side``), as
    JPEG and PNG, and a CSV listing them."""
    rng = random.Random(seed)
    bases = [Image.open(DATA / "chelsea.jpg").convert("RGB"), Image.open(DATA / "coffee.jpg").convert("RGB")]
    rows = []
    for i in range(n):
        img = bases[i % 2]
        w, h = img.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        short = rng.randint(*short_side)
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


def bare_forward(fwd, pixels: torch.Tensor, batch_size: int, lanes: int = 1, threads: int | None = None) -> float:
    """Images per second of ``fwd`` (a runner, or the tower) on ready tensors, ``lanes`` batches at a time."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    def run(x):
        with torch.inference_mode():
            return fwd(x)

    batches = [pixels[s:s + batch_size] for s in range(0, len(pixels), batch_size)]
    try:
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(run, [pixels[:batch_size]] * lanes))  # warm-up
            t = time.perf_counter()
            list(pool.map(run, batches))
            return len(pixels) / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)


def decode_costs(records, preprocess, n: int = 100) -> tuple[float, float]:
    """Milliseconds one core spends per image decoding it, and resizing + cropping it (uint8 out)."""
    records = records[:n]
    t = time.perf_counter()
    images = [load_image(r.path) for r in records]
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    for img in images:
        preprocess.eval(img)
    t_resize = time.perf_counter() - t
    return 1000 * t_decode / len(records), 1000 * t_resize / len(records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tower", default="efficientnet-lite0", help="tower spec, or 'tiny' for the test tower")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--short-side", default="200-640", metavar="MIN-MAX",
                   help="shorter side of the images in px (default 200-640; img2dataset writes 256-256)")
    p.add_argument("--batch-size", type=int, default=default_batch_size(), help="default: littune's (16 on a CPU)")
    p.add_argument("--workers", type=int, default=None, help=f"decoding workers (default {default_workers()})")
    p.add_argument("--lanes", type=int, default=None, help=f"concurrent forwards (default {default_lanes()})")
    p.add_argument("--threads", type=int, default=None, help="torch threads per lane (default: littune's choice)")
    p.add_argument("--views", type=int, default=0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best of each measurement counts")
    p.add_argument("--dir", help="keep the images (and reuse them) here instead of a temporary folder")
    args = p.parse_args(argv)
    sides = tuple(int(x) for x in args.short_side.split("-"))
    workers = default_workers() if args.workers is None else args.workers
    lanes = default_lanes() if args.lanes is None else args.lanes
    threads = default_threads(workers, lanes) if args.threads is None else args.threads
    default_torch_threads = torch.get_num_threads()

    from littune.towers.tiny import SPEC

    tower = build_image_tower(SPEC if args.tower == "tiny" else args.tower).eval()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="littune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        csv_path = work / "pairs.csv"
        if not (args.dir and csv_path.exists() and len(open_source(csv_path)) == args.images):
            csv_path = make_images(work, args.images, short_side=sides)
            print(f"made {args.images} images in {time.perf_counter() - t:.1f}s under {work}", file=sys.stderr)
        source = open_source(csv_path)
        records = source.records()
        ms_decode, ms_resize = decode_costs(records, tower.preprocess)
        pixels = torch.stack([tower.preprocess.eval(load_image(r.path)) for r in records])
        res = rounds(args, tower, source, pixels, workers, lanes, threads)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v) for k, v in res.items()}
    chosen = res["chosen"]
    per = 1 + args.views  # with K views the pipeline runs 1 + K forwards per image: compare per forward
    print(f"tower {tower.name}, {args.images} images (JPEG+PNG, {args.short_side} px), batch {args.batch_size}, "
          f"{_cores()} cores, {workers} decoding worker(s), {lanes} lane(s) x {threads} thread(s), "
          f"best of {args.repeat} rounds")
    print(f"one core per image: decode {ms_decode:.2f} ms, resize + crop + normalise {ms_resize:.2f} ms")
    print(f"bare forward, torch eager plain loop ({default_torch_threads} threads): {best['eager']:7.1f} images/s")
    for rt in ("torch", chosen):
        print(f"bare forward, runtime {rt:<12}                 : {best['bare ' + rt]:7.1f} images/s")
        print(f"embed pipeline, runtime {rt:<12}               : {best['pipe ' + rt]:7.1f} images/s")
    speedup = best[f"pipe {chosen}"] / best["pipe torch"]
    ratio = best[f"pipe {chosen}"] * per / best[f"bare {chosen}"]
    print(f"result: embed_speedup_vs_torch_eager = {speedup:.2f}")
    print(f"result: embed_pipeline_vs_bare = {ratio:.3f}")
    return 0


def rounds(args, tower, source, pixels, workers: int, lanes: int, threads: int) -> dict:
    """Interleaved rounds of every measurement; ``chosen`` is the runtime ``auto`` picks here."""
    res: dict = {"eager": []}
    for r in range(args.repeat):
        res["eager"].append(bare_forward(tower, pixels, args.batch_size))
        line = [f"eager {res['eager'][-1]:.1f}"]
        for rt in ("auto", "torch"):
            runner = open_runner(tower, rt, threads=threads, quiet=r > 0)
            name = runner.name
            if rt == "auto":
                res["chosen"] = name
            res.setdefault(f"bare {name}", []).append(bare_forward(runner, pixels, args.batch_size, lanes, threads))
            runner.close()
            t = time.perf_counter()
            cache = embed_source(source, tower, Path(tempfile.mkdtemp(prefix="littune-bench-cache-")),
                                 dtype=args.dtype, views=args.views, batch_size=args.batch_size, workers=workers,
                                 lanes=lanes, threads=threads, resume=False, progress=False, runtime=rt)
            res.setdefault(f"pipe {name}", []).append(len(pixels) / (time.perf_counter() - t))
            assert len(cache) == len(pixels) and cache.manifest["runtime"] == name, cache.manifest.get("runtime")
            shutil.rmtree(cache.directory, ignore_errors=True)
            line.append(f"{rt}->{name}: bare {res[f'bare {name}'][-1]:.1f}, pipeline {res[f'pipe {name}'][-1]:.1f}")
            if rt == "auto" and name == "torch":  # nothing faster here: one torch measurement is enough
                break
        print(f"  round {r + 1}: " + " | ".join(line) + " images/s", file=sys.stderr)
    return res


if __name__ == "__main__":
    sys.exit(main())
