"""Embedding throughput: the whole ``littune embed`` pipeline on each runtime, against the bare forward.

Makes ``--images`` real image files (random crops and resizes of ``tests/data/chelsea.jpg`` and
``coffee.jpg``, shorter side 200-640 px by default, 3/4 JPEG and 1/4 PNG) in a temporary folder with a CSV of
captions. It prints what one image costs to decode and to resize/crop, with exact and with fast decoding
(CPU time of one thread, milliseconds: a busy neighbour slows the clock, not this), then times, in
interleaved rounds (``--repeat``; the best round of each counts, so a busy neighbour on a shared
machine hurts all alike):

* the **bare forward** of each runtime: the tower on ready, preprocessed tensors in batches of
  ``--batch-size`` on the pipeline's forward lanes and threads -- no file reading, decoding or
  resizing; for torch also as a plain loop with torch's default threads (``tower(x)``, eager);
* the **pipeline** on each runtime: :func:`littune.cache.embed_source` over the CSV, from opening the
  files to the finished cache on disk (decoding in worker processes overlapped with the forward,
  shard writes, checksums, manifest), with ``runtime="auto"`` (onnxruntime on a CPU, torch with
  autocast and channels_last on CUDA) and with ``runtime="torch"``, and a third time on the chosen
  runtime with fast decoding (``littune embed --fast-decode``: JPEG draft + reducing_gap), the same files.
  Each pipeline's CPU time per image (this process and its decoding workers) is printed too.

With tokens (``littune embed --tokens [GRID]``; skipped with ``--no-tokens``), in the same rounds: the pipeline
again on each runtime storing the tower's spatial map (EfficientNet-Lite0: 7 x 7 x 1280 float16) and, on the
chosen runtime, pooled to ``--tokens-grid`` (default 4: 4 x 4); the bare forward of onnxruntime's graph with
the map as a second output (the extra output's cost); the token shards' bytes per image on disk.

It ends with ``result:`` lines: ``embed_speedup_vs_torch_eager`` (pipeline on the chosen runtime /
pipeline with ``--runtime torch``; target >= 2.5 on a CPU) and ``embed_pipeline_vs_bare`` (pipeline /
the chosen runtime's bare forward; target >= 0.85), then the same two with the fast-decoding pipeline
in the numerator (``..._fast_decode``; the denominators are the same); with tokens also
``embed_tokens_vs_plain_RUNTIME`` (pipeline with ``--tokens`` / without, per runtime, the same round's files),
``embed_tokens_GRID_vs_plain_RUNTIME`` (``--tokens GRID``), ``onnxruntime_map_output_vs_plain`` (bare forward with
the map output / without; 1.0 = free) and ``token_bytes_per_image_native`` / ``token_bytes_per_image_grid_GRID``.
Run from the repository root:

    python benchmarks/embed_throughput.py                        # efficientnet-lite0, 512 images
    python benchmarks/embed_throughput.py --tower tiny --images 2000   # the decode-bound extreme
    python benchmarks/embed_throughput.py --images 64 --repeat 2       # a small run, tokens included
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from littune.cache import _cores, default_batch_size, default_lanes, default_threads, default_workers, embed_source
from littune.cache.tokens import bytes_per_image, pooled_and_map
from littune.data.decode import load_image
from littune.data.sources import open_source
from littune.towers.runtime import open_runner
from littune.towers.image import build_image_tower, parse_image_tower

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
    """CPU milliseconds one thread spends per image decoding it, and resizing + cropping it to uint8
    (what a decoding worker does), with ``preprocess``'s decoding (exact or fast)."""
    records = records[:n]
    t = time.thread_time()
    images = [load_image(r.path, reduce_to=preprocess.draft_to) for r in records]
    t_decode = time.thread_time() - t
    t = time.thread_time()
    for img in images:
        preprocess.eval_uint8(img)
    t_resize = time.thread_time() - t
    return 1000 * t_decode / len(records), 1000 * t_resize / len(records)


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (the decoding workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def fast_decoding(tower):
    """The same tower with ``decode="fast"`` (what ``littune embed --fast-decode`` builds)."""
    return build_image_tower({**parse_image_tower(tower.spec), "decode": "fast"}).eval()


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
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="skip the --tokens measurements")
    p.add_argument("--tokens-grid", type=int, default=4, metavar="GRID", help="the pooled token grid (default 4)")
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
        fast = fast_decoding(tower)
        open_runner(fast, "auto", threads=threads, quiet=True).close()  # its own fingerprint: export it untimed
        if args.tokens:  # the graph with the map output: exported untimed too
            open_runner(tower, "auto", threads=threads, quiet=True, spatial=pooled_and_map).close()
        costs = {"exact": decode_costs(records, tower.preprocess), "fast": decode_costs(records, fast.preprocess)}
        pixels = torch.stack([tower.preprocess.eval(load_image(r.path)) for r in records])
        res = rounds(args, tower, fast, source, pixels, workers, lanes, threads)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    report(args, tower, res, costs, (workers, lanes, threads), default_torch_threads)
    return 0


def report(args, tower, res: dict, costs: dict, speed: tuple, default_torch_threads: int) -> None:
    """The table, then the ``result:`` lines (best round of each measurement)."""
    best = {k: max(v) for k, v in res.items() if k != "chosen"}
    cpu = {k[4:]: min(v) for k, v in res.items() if k.startswith("cpu ")}
    chosen = res["chosen"]
    per = 1 + args.views  # with K views the pipeline runs 1 + K forwards per image: compare per forward
    print(f"tower {tower.name}, {args.images} images (JPEG+PNG, {args.short_side} px), batch {args.batch_size}, "
          f"{_cores()} cores, {speed[0]} decoding worker(s), {speed[1]} lane(s) x {speed[2]} thread(s), "
          f"best of {args.repeat} rounds")
    for how, (ms_decode, ms_resize) in costs.items():
        print(f"one core per image, {how} decoding: decode {ms_decode:.2f} ms + resize + crop {ms_resize:.2f} ms "
              f"= {ms_decode + ms_resize:.2f} ms (CPU time)")
    print(f"bare forward, torch eager plain loop ({default_torch_threads} threads): {best['eager']:7.1f} images/s")
    for rt in ("torch", chosen, f"{chosen} fast-decode"):
        if rt in cpu:  # the fast-decoding pipeline has no bare forward of its own: it is the chosen runtime's
            if not rt.endswith("fast-decode"):
                print(f"bare forward, runtime {rt:<24}     : {best['bare ' + rt]:7.1f} images/s")
            print(f"embed pipeline, runtime {rt:<24}   : {best['pipe ' + rt]:7.1f} images/s, "
                  f"{cpu[rt]:.2f} CPU ms per image")
    pipe, pipe_fast, bare = best[f"pipe {chosen}"], best[f"pipe {chosen} fast-decode"], best[f"bare {chosen}"]
    print(f"result: embed_speedup_vs_torch_eager = {pipe / best['pipe torch']:.2f}")
    print(f"result: embed_pipeline_vs_bare = {pipe * per / bare:.3f}")
    print(f"result: embed_speedup_vs_torch_eager_fast_decode = {pipe_fast / best['pipe torch']:.2f}")
    print(f"result: embed_pipeline_vs_bare_fast_decode = {pipe_fast * per / bare:.3f}")
    if args.tokens:
        report_tokens(args, best, res, chosen)


def report_tokens(args, best: dict, res: dict, chosen: str) -> None:
    """The token lines: pipelines with and without tokens, the map output's cost, bytes per image."""
    g = args.tokens_grid
    for rt in dict.fromkeys((chosen, "torch")):
        if f"pipe {rt} tokens" in best:
            print(f"embed pipeline with --tokens, runtime {rt:<12}: {best[f'pipe {rt} tokens']:7.1f} images/s "
                  f"(without: {best[f'pipe {rt}']:.1f})")
    print(f"embed pipeline with --tokens {g}, runtime {chosen:<10}: {best[f'pipe {chosen} tokens{g}']:7.1f} images/s")
    if f"bare {chosen} map" in best:
        print(f"bare forward with the map output, runtime {chosen}: {best[f'bare {chosen} map']:7.1f} images/s "
              f"(without: {best[f'bare {chosen}']:.1f})")
    native, pooled = res[f"bytes {chosen} tokens"][0], res[f"bytes {chosen} tokens{g}"][0]
    print(f"token shards on disk: {native:,.0f} bytes per image (native grid), {pooled:,.0f} (--tokens {g})")
    for rt in dict.fromkeys((chosen, "torch")):
        if f"pipe {rt} tokens" in best:
            print(f"result: embed_tokens_vs_plain_{rt} = {best[f'pipe {rt} tokens'] / best[f'pipe {rt}']:.3f}")
    print(f"result: embed_tokens_{g}_vs_plain_{chosen} = {best[f'pipe {chosen} tokens{g}'] / best[f'pipe {chosen}']:.3f}")
    if f"bare {chosen} map" in best:
        print(f"result: {chosen}_map_output_vs_plain = {best[f'bare {chosen} map'] / best[f'bare {chosen}']:.3f}")
    print(f"result: token_bytes_per_image_native = {native:.0f}")
    print(f"result: token_bytes_per_image_grid_{g} = {pooled:.0f}")


def rounds(args, tower, fast, source, pixels, workers: int, lanes: int, threads: int) -> dict:
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
            speed = (workers, lanes, threads)
            line.append(f"{rt}->{name}: bare {res[f'bare {name}'][-1]:.1f}, "
                        f"pipeline {pipeline(args, tower, source, rt, name, res, speed):.1f}")
            if rt == "auto":  # the same runtime, with fast decoding
                line.append(f"fast-decode pipeline {pipeline(args, fast, source, rt, name, res, speed):.1f}")
            if args.tokens:
                line.append(token_rounds(args, tower, source, pixels, rt, name, res, speed))
            if rt == "auto" and name == "torch":  # nothing faster here: one torch measurement is enough
                break
        print(f"  round {r + 1}: " + " | ".join(line) + " images/s", file=sys.stderr)
    return res


def token_rounds(args, tower, source, pixels, rt: str, name: str, res: dict, speed: tuple) -> str:
    """This round's token measurements on runtime ``rt`` (``name``): the pipeline with ``--tokens``, and on the
    chosen runtime with ``--tokens GRID`` and the bare forward of the graph with the map output."""
    line = f"tokens pipeline {pipeline(args, tower, source, rt, name, res, speed, tokens=True):.1f}"
    if rt != "auto":
        return line
    line += f", tokens {args.tokens_grid} pipeline "
    line += f"{pipeline(args, tower, source, rt, name, res, speed, tokens=args.tokens_grid):.1f}"
    if name == "onnxruntime":
        workers, lanes, threads = speed
        runner = open_runner(tower, rt, threads=threads, quiet=True, spatial=pooled_and_map)
        res.setdefault(f"bare {name} map", []).append(bare_forward(runner, pixels, args.batch_size, lanes, threads))
        runner.close()
        line += f", bare with map {res[f'bare {name} map'][-1]:.1f}"
    return line


def pipeline(args, tower, source, rt: str, name: str, res: dict, speed: tuple, tokens=None) -> float:
    """One whole ``embed_source`` run into a fresh folder; records images/s and CPU ms per image in ``res``
    (and with ``tokens``, the token shards' bytes per image)."""
    n = len(source.records())
    key = name + (" fast-decode" if tower.preprocess.decode == "fast" else "")
    key += "" if tokens is None else " tokens" if tokens is True else f" tokens{tokens}"
    workers, lanes, threads = speed
    t, c = time.perf_counter(), cpu_seconds()
    cache = embed_source(source, tower, Path(tempfile.mkdtemp(prefix="littune-bench-cache-")),
                         dtype=args.dtype, views=args.views, batch_size=args.batch_size, workers=workers,
                         lanes=lanes, threads=threads, resume=False, progress=False, runtime=rt, tokens=tokens)
    res.setdefault(f"pipe {key}", []).append(n / (time.perf_counter() - t))
    res.setdefault(f"cpu {key}", []).append(1000 * (cpu_seconds() - c) / n)
    if tokens is not None:
        assert cache.has_tokens
        res.setdefault(f"bytes {key}", []).append(bytes_per_image(cache))
    assert len(cache) == n and cache.manifest["runtime"] == name, cache.manifest.get("runtime")
    assert cache.manifest["preprocess"]["decode"] == tower.preprocess.decode
    shutil.rmtree(cache.directory, ignore_errors=True)
    return res[f"pipe {key}"][-1]


if __name__ == "__main__":
    sys.exit(main())
