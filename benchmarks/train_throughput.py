"""Training throughput: from the embedding cache vs running the locked tower every step vs bare compute.

EfficientNet-Lite0 (locked) + a 6-layer 384-wide text transformer, batch 64 and 256, 2 CPU cores:

  (a) `littune train` from the embedding cache (the LiT way: the image model is never run),
  (b) the same model with the locked image tower run on every step on decoded images
      (what open_clip's --lock-image does),
  (c) the bare compute limit: text forward + backward + loss + optimiser step on ready tensors.

Prints pairs/s and peak RSS of each (each measured in its own process) and the ratios (a)/(c) and (a)/(b).
Each rate is the steady state: the first 2 steps (set-up, lazy allocations) are left out of (a) and (b)
as of (c), and every other step counts whole (data, tokenisation, logging and all).

Then the memory check (``--no-memory`` skips it): a few training steps from a 10k-row and from a 1M-row
cache (synthetic features in the real cache format, written with ``littune.cache.write_cache`` for a
1280-d tiny tower, float16: ~2.6 GB on disk; two captions per image), each in its own process. Peak RSS
(the whole process: opening and verifying the cache, training the tokenizer on every caption, training)
and steady RSS (the median after each step from the 3rd) must differ by less than 100 MB: the trainer
reads rows and captions from the cache with pread, step by step, and holds nothing per image but the
epoch's permutation (8 bytes a row).

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--batches 64,256] [--no-memory]
    .venv/bin/python benchmarks/train_throughput.py --no-throughput --memory-rows 10000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = "{type: transformer, width: 384, depth: 6, heads: 6, context_length: 32, vocab_size: 8000}"


def make_images(root: Path, n: int) -> Path:
    """n real JPEG/PNG files cut from the bundled photos, two captions each, as a CSV source."""
    from PIL import Image

    photos = [Image.open(HERE.parent / "tests" / "data" / f).convert("RGB") for f in ("chelsea.jpg", "coffee.jpg")]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    words = ["cat", "coffee", "cup", "animal", "drink", "table", "fur", "whiskers", "espresso", "saucer"]
    rows = ["image,caption"]
    for i in range(n):
        im = photos[i % 2]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch)).resize((int(rng.integers(240, 400)), int(rng.integers(240, 400))))
        name = f"img{i:05d}.{'jpg' if i % 3 else 'png'}"
        crop.save(root / name, quality=90) if name.endswith("jpg") else crop.save(root / name)
        for _ in range(2):
            rows.append(f"{name},a photo of a {' '.join(rng.choice(words, size=4))}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def run_child(kind: str, **kw) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(kw)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode:
        raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss survives exec, so a child would report at least the
    RSS the parent had when it forked)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


WARMUP = 2  # steps left out of every rate: (c) runs them before its clock starts, (a) and (b) log them


def child_train(source: str, cache: str, run: str, batch: int, steps: int, on_the_fly: bool) -> dict:
    from littune.config import load_config
    from littune.trainer import Trainer

    overrides = [f"data.source={source}", f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}",
                 f"steps={steps}", "progress=false", "log_every=1", "checkpoint_every=0",
                 f"model.text_tower={TEXT}", "schedule.warmup_steps=2", f"data.on_the_fly={str(on_the_fly).lower()}",
                 "data.workers=1"]
    trainer = Trainer(load_config(overrides=overrides))
    t0 = time.perf_counter()
    trainer.run()
    total = time.perf_counter() - t0
    rec = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    # The trainer's own per-step rate (everything between two steps: batch, tokenisation, logging...).
    secs = [batch / r["pairs_per_s"] for r in rec]
    return {"pairs_per_s": batch * (len(secs) - WARMUP) / sum(secs[WARMUP:]),
            "pairs_per_s_all_steps": batch * len(secs) / sum(secs), "total_s": total, "peak_rss_mb": peak_rss_mb()}


# -- memory: a 10k-row vs a 1M-row cache ------------------------------------------------------------
MEM_TEXT = "{type: transformer, width: 128, depth: 2, heads: 2, context_length: 32, vocab_size: 8000}"
WORDS = ("cat dog cup coffee animal drink table fur whiskers espresso saucer red green blue small large "
         "photo picture drawing sketch on under with near old young wooden metal glass plate bowl bird "
         "tree house street car bike river mountain beach snow night morning sunny cloudy").split()


def mem_tower(dim: int) -> dict:
    from littune.towers.tiny import SPEC

    return {**SPEC, "kwargs": {"dim": dim}}  # a real (tiny) tower whose outputs are dim-d


class SyntheticFeatures:
    """Rows of random features, made one slice at a time (write_cache reads one shard at a time)."""

    def __init__(self, n: int, dim: int):
        self.n, self.dim = n, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi, _ = sl.indices(self.n)
        return np.random.default_rng([1, lo]).standard_normal((hi - lo, self.dim), dtype=np.float32)


class SyntheticCaptions:
    """Two captions per image, 4-7 words each, from a small vocabulary."""

    def __init__(self, n: int):
        self.n = n
        rng = np.random.default_rng(2)
        self.words = rng.integers(0, len(WORDS), size=(n, 2, 7), dtype=np.int16)
        self.lengths = rng.integers(4, 8, size=(n, 2), dtype=np.int8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list[str]:
        return ["a " + " ".join(WORDS[w] for w in self.words[i, j, :self.lengths[i, j]]) for j in range(2)]


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memtrain(cache: str, run: str, batch: int, steps: int, dim: int) -> dict:
    from littune import trainer as T
    from littune.config import load_config

    rss = []
    log = T.Monitor.log

    def logged(self, record):  # RSS after every step
        log(self, record)
        rss.append(current_rss_mb())

    T.Monitor.log = logged
    overrides = [f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}", f"steps={steps}",
                 "progress=false", "log_every=1", "checkpoint_every=0", f"model.text_tower={MEM_TEXT}",
                 f"model.image_tower={json.dumps(mem_tower(dim))}", "schedule.warmup_steps=2"]
    t0 = time.perf_counter()
    T.Trainer(load_config(overrides=overrides)).run()
    # steady: the median RSS after each step past the first WARMUP (one step's reading swings by tens
    # of MB as the allocator maps and returns activation buffers)
    return {"peak_rss_mb": peak_rss_mb(), "steady_rss_mb": float(np.median(rss[WARMUP:])), "train_rss_mb": rss,
            "total_s": time.perf_counter() - t0}


def memory_check(tmp: Path, rows: list[int], batch: int, steps: int, limit_mb: float = 100.0) -> bool:
    import shutil

    from littune.cache import write_cache

    free = shutil.disk_usage(tmp).free
    dim = 1280
    for d in (1280, 768, 512, 256, 128):  # float16 features; a smaller dim only if the disk is short
        dim = d
        if max(rows) * (d * 2 + 64) * 1.1 + (1 << 30) < free:
            break
    note = "" if dim == 1280 else f" (disk short: {free / 2**30:.1f} GB free, so {dim}-d instead of 1280-d)"
    print(f"\nmemory check: {', '.join(f'{n:,}' for n in rows)}-row caches of {dim}-d float16 features{note}, "
          f"batch {batch}, {steps} steps, 2-layer 128-wide text tower, each run in its own process")
    results = []
    for n in rows:
        cache = tmp / f"mem{n}"
        t0 = time.perf_counter()
        write_cache(cache, SyntheticFeatures(n, dim), SyntheticCaptions(n), mem_tower(dim), dtype="float16")
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        wrote = time.perf_counter() - t0
        r = run_child("memtrain", cache=str(cache), run=str(tmp / f"memrun{n}"), batch=batch, steps=steps, dim=dim)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp / f"memrun{n}", ignore_errors=True)
        results.append((n, size, wrote, r))
    print(f"\n| cache rows | on disk | written in | train run (set-up + steps) | peak RSS | steady RSS (median after "
          f"steps {WARMUP + 1}-{steps}) |")
    print("|---|---|---|---|---|---|")
    for n, size, wrote, r in results:
        print(f"| {n:,} | {size / 2**20:,.0f} MB | {wrote:.0f} s | {r['total_s']:.0f} s | {r['peak_rss_mb']:.0f} MB | "
              f"{r['steady_rss_mb']:.0f} MB |")
    ok = True
    (n0, _, _, small), (n1, _, _, big) = results[0], results[-1]
    for what in ("peak_rss_mb", "steady_rss_mb"):
        diff = big[what] - small[what]
        ok &= diff < limit_mb
        print(f"{what.replace('_rss_mb', '')} RSS {n1:,} rows - {n0:,} rows: {diff:+.0f} MB -> "
              f"{'PASS' if diff < limit_mb else 'FAIL'} (limit {limit_mb:.0f} MB)")
    return ok


def child_bare(batch: int, steps: int, dim: int = 1280) -> dict:
    import torch

    from littune.losses import ContrastiveLoss
    from littune.towers.text import TextTransformer, TextTransformerConfig

    torch.manual_seed(0)
    text = TextTransformer(TextTransformerConfig(vocab_size=8000, width=384, depth=6, heads=6, context_length=32),
                           tokenizer=None)
    head_i, head_t = torch.nn.Linear(dim, 512), torch.nn.Linear(384, 512)
    scale = torch.nn.Parameter(torch.tensor(2.3))
    params = [*text.parameters(), *head_i.parameters(), *head_t.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss_fn = ContrastiveLoss()
    feats = torch.randn(batch, dim)
    ids = torch.randint(4, 8000, (batch, 32))
    mask = torch.ones(batch, 32, dtype=torch.long)
    mask[:, 12:] = 0

    def step():
        img = torch.nn.functional.normalize(head_i(feats), dim=-1)
        txt = torch.nn.functional.normalize(head_t(text(ids, mask)), dim=-1)
        loss = loss_fn(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"pairs_per_s": batch * steps / (time.perf_counter() - t0), "peak_rss_mb": peak_rss_mb()}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """This machine's dense fp32 matmul rate: the figures above scale with it across machines."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                    help="measure (a), (b), (c) (default: on)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="the 10k-row vs 1M-row cache memory check (default: on)")
    ap.add_argument("--memory-rows", default="10000,1000000")
    ap.add_argument("--memory-steps", type=int, default=8)
    ap.add_argument("--memory-batch", type=int, default=256)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        kind, kw = args.child
        fn = {"train": child_train, "bare": child_bare, "memtrain": child_memtrain}[kind]
        print(json.dumps(fn(**json.loads(kw))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{matmul_gflops():.0f} GFLOP/s fp32 matmul (to compare machines)")
    tmp = Path(tempfile.mkdtemp(prefix="littune-bench-"))
    ok = True
    if args.throughput:
        throughput(tmp, args)
    if args.memory:
        ok = memory_check(tmp, [int(n) for n in args.memory_rows.split(",")], args.memory_batch, args.memory_steps)
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not ok:
        raise SystemExit(1)


def throughput(tmp: Path, args) -> None:
    source = make_images(tmp / "images", args.images)
    cache = tmp / "cache"
    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    t0 = time.perf_counter()
    embed_source(open_source(source), build_image_tower("efficientnet-lite0").eval(), cache, progress=False)
    print(f"embedded {args.images} images once in {time.perf_counter() - t0:.1f} s")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        a = run_child("train", source=str(source), cache=str(cache), run=str(tmp / f"a{batch}"), batch=batch,
                      steps=args.steps, on_the_fly=False)
        b = run_child("train", source=str(source), cache=str(cache), run=str(tmp / f"b{batch}"), batch=batch,
                      steps=max(3, args.steps // 4) + WARMUP, on_the_fly=True)
        c = run_child("bare", batch=batch, steps=args.steps)
        rows.append((batch, a, b, c))
    print(f"\nsteady-state pairs/s (first {WARMUP} steps left out of each)")
    print("\n| batch | (a) cache pairs/s | (b) tower every step | (c) bare compute | (a)/(c) | (a)/(b) | peak RSS a / b / c (MB) |")
    print("|---|---|---|---|---|---|---|")
    for batch, a, b, c in rows:
        print(f"| {batch} | {a['pairs_per_s']:.1f} | {b['pairs_per_s']:.1f} | {c['pairs_per_s']:.1f} | "
              f"{a['pairs_per_s'] / c['pairs_per_s']:.2f} | {a['pairs_per_s'] / b['pairs_per_s']:.1f} | "
              f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |")
    print("\n(with the first steps counted too: " + "; ".join(
        f"batch {batch}: (a) {a['pairs_per_s_all_steps']:.1f}, (b) {b['pairs_per_s_all_steps']:.1f}"
        for batch, a, b, _ in rows) + ")")


if __name__ == "__main__":
    main()
