"""Training throughput: from the embedding cache vs running the locked tower every step vs bare compute.

EfficientNet-Lite0 (locked) + a 6-layer 384-wide text transformer, batch 64 and 256, 2 CPU cores:

  (a) `littune train` from the embedding cache (the LiT way: the image model is never run),
  (b) the same model with the locked image tower run on every step on decoded images
      (what open_clip's --lock-image does),
  (c) the bare compute limit: text forward + backward + loss + optimiser step on ready tensors, on the
      same shapes as (a): the same cached features and sampled captions, tokenized as the trainer does
      before the clock starts (the text transformer packs: one call, no compute on padding; a tower that
      does not is cut into the trainer's dynamic-padding groups, ``data.text_buckets``).

Prints pairs/s and peak memory of each (each measured in its own process) and the ratios (a)/(c) and (a)/(b),
then the text tower's FLOPs per pair on the real tokens (padding left out; forward + backward = 3x the
forward's matmuls) and the utilisation they give (a) against the fp32 matmul rate measured at the start.
Each rate is the steady state: the first 2 steps (set-up, lazy allocations) are left out of (a) and (b)
as of (c), and every other step counts whole (data, tokenisation, logging and all).

Then the memory check (``--no-memory`` skips it): a few training steps from a 10k-row and from a 1M-row
cache (synthetic features in the real cache format, written with ``littune.cache.write_cache`` for a
1280-d tiny tower, float16: ~2.6 GB on disk; two captions per image), each in its own process. Peak RSS
(the whole process: opening and verifying the cache, training the tokenizer on every caption, training)
and steady RSS (the median after each step from the 3rd) must differ by less than 100 MB: the trainer
reads rows and captions from the cache with pread, step by step, and holds nothing per image but the
epoch's permutation (8 bytes a row). Both runs train ``model.setting=Lu`` (named, so that a change of default
does not change what is measured): the text tower trains, and no text cache is filled. With ``LL`` (the default)
the locked text tower's features of every distinct caption are first computed into a text cache, which is read
with pread and holds 16 bytes a caption in memory; the allocator keeps some of what that one-off fill used
(+114 MB peak at 10k vs 100k rows, with 2 captions a row, at ``fd83c37``).

``--memory-tokens`` does the same for the attention image head (``model.image_head=attention``) trained
from a token cache: synthetic 4 x 4 x 1280 float16 tokens (EfficientNet-Lite0's width) beside the 1280-d
features, written with ``write_cache(..., tokens=...)`` at ``--memory-token-rows`` (10k and 100k: ~4.5 GB on
disk for 100k), each trained in its own process; it prints ``result: attention_head_rss_growth_mb`` (the
larger of the peak and steady RSS growth from the smallest to the largest cache; target < 100 MB).

Then the largest batch (``--no-max-batch`` skips it; the paper's Table 7: precomputed embeddings let far
larger batches fit). A global batch *trains* if `littune train` runs 2 steps of it in a fresh process that
exits cleanly (no out-of-memory, finite loss), whose peak memory stays under ``--mem-limit-gib`` (20 GiB:
VmHWM on CPU, polled and killed above it; GPU memory allocated by torch on CUDA, where the process is also
capped at that much) and whose wall time (start, set-up, 2 steps, export) stays under ``--max-batch-cap-s``.
The batch doubles from a start until a trial fails, then the midpoint of the last good and the first bad
is tried once. Both sides train the same small text tower (2 layers, 128 wide) and the same 512-d heads:

  (a) from a cache (synthetic 1280-d features, EfficientNet-Lite0's width, in the real cache format):
      the chunked loss (``model.loss_chunk``, its default) and ``grad_accum`` micro-batches of 512 pairs;
  (b) the locked EfficientNet-Lite0 run every step on decoded images, the whole global batch in one pass
      (``grad_accum=1``, the full logit matrix: open_clip's --lock-image with its default accum_freq 1).

On 2 CPU cores both searches are usually stopped by the time cap, not memory: the figure is then the
largest batch whose 2 steps fit the cap. On a CUDA machine the same code runs on the GPU.

Then beside a busy core (``--no-loaded`` skips it; issue 24: on a loaded 2-core machine the trainer's
pairs/s varied 32x between runs): training from a cache (synthetic 1280-d features in the real cache format),
each run in its own process with the threads ``littune train`` would take (``--threads N`` to choose), first
quiet, then beside a second process that busy-loops on one core (started before the run, killed after), the
same steps; ``--loaded-rounds`` times in turn, each round's ratio from its two runs a minute apart (the rest of
the machine's load drifts over minutes), the median of the rounds. Two workloads: the default LL (the two heads
train on cached image and text features, batch 1024) and Lu (the 6x384 text transformer trains, batch 64).
``cache_loaded_vs_quiet`` is the lower of their median loaded/quiet ratios (the target: >= 0.5); the table says the
torch threads and OMP_WAIT_POLICY used. "Quiet" is the machine as it is: the load average before each run is
printed, since other work on the cores moves both figures.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--batches 64,256] [--no-memory]
    .venv/bin/python benchmarks/train_throughput.py --no-throughput --memory-rows 10000,1000000
    .venv/bin/python benchmarks/train_throughput.py --no-throughput --no-memory --max-batch-cap-s 60
    .venv/bin/python benchmarks/train_throughput.py --no-throughput --no-memory --no-max-batch --memory-tokens
    .venv/bin/python benchmarks/train_throughput.py --no-throughput --no-memory --no-max-batch [--threads 1]
    .venv/bin/python benchmarks/train_throughput.py --quick       # a smoke run of every part

It ends with ``result: NAME = NUMBER`` lines (``nan`` for a part that was skipped).
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
        if not (root / name).exists():  # else an earlier call wrote it (the same draws: the same file)
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


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated by torch on CUDA, peak RSS on CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()


def memory_name() -> str:
    return "peak GPU memory" if device_name() == "cuda" else "peak RSS"


WARMUP = 2  # steps left out of every rate: (c) runs them before its clock starts, (a) and (b) log them


def child_train(source: str, cache: str, run: str, batch: int, steps: int, on_the_fly: bool) -> dict:
    from littune.config import load_config
    from littune.train.trainer import Trainer

    overrides = [f"data.source={source}", f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}",
                 f"steps={steps}", "progress=false", "log_every=1", "checkpoint_every=0", "model.setting=Lu",
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
            "pairs_per_s_all_steps": batch * len(secs) / sum(secs), "total_s": total, "peak_rss_mb": peak_memory_mb()}


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


class SyntheticTokens:
    """Rows of random ``(grid * grid, dim)`` token maps, float16, made one slice at a time."""

    def __init__(self, n: int, grid: int, dim: int):
        self.n, self.grid, self.dim = n, grid, dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        lo, hi, _ = sl.indices(self.n)
        rng = np.random.default_rng([3, lo])
        return rng.standard_normal((hi - lo, self.grid * self.grid, self.dim), dtype=np.float32).astype(np.float16)


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


def child_memtrain(cache: str, run: str, batch: int, steps: int, dim: int, tokens: bool = False) -> dict:
    from littune.train import trainer as T
    from littune.config import load_config

    rss = []
    log = T.Monitor.log

    def logged(self, record):  # RSS after every step
        log(self, record)
        rss.append(current_rss_mb())

    T.Monitor.log = logged
    overrides = [f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}", f"steps={steps}",
                 "progress=false", "log_every=1", "checkpoint_every=0", "model.setting=Lu",
                 f"model.text_tower={MEM_TEXT}",
                 f"model.image_tower={json.dumps(mem_tower(dim))}", "schedule.warmup_steps=2"]
    overrides += ["model.image_head=attention"] if tokens else []  # trained from the cache's tokens
    t0 = time.perf_counter()
    T.Trainer(load_config(overrides=overrides)).run()
    # steady: the median RSS after each step past the first WARMUP (one step's reading swings by tens
    # of MB as the allocator maps and returns activation buffers)
    return {"peak_rss_mb": peak_rss_mb(), "steady_rss_mb": float(np.median(rss[WARMUP:])), "train_rss_mb": rss,
            "total_s": time.perf_counter() - t0}


def memory_check(tmp: Path, rows: list[int], batch: int, steps: int, limit_mb: float = 100.0,
                 grid: int = 0) -> tuple[bool, float]:
    """``(passed, growth in MB)``; ``grid``: token caches of ``grid x grid`` tokens, the attention head."""
    import shutil

    from littune.cache import write_cache

    free = shutil.disk_usage(tmp).free
    dim = 1280
    for d in (1280, 768, 512, 256, 128):  # float16 features; a smaller dim only if the disk is short
        dim = d
        if max(rows) * (d * 2 * (1 + grid * grid) + 64) * 1.1 + (1 << 30) < free:
            break
    note = "" if dim == 1280 else f" (disk short: {free / 2**30:.1f} GB free, so {dim}-d instead of 1280-d)"
    what = f" + {grid} x {grid} x {dim} float16 tokens, attention image head" if grid else ""
    print(f"\nmemory check: {', '.join(f'{n:,}' for n in rows)}-row caches of {dim}-d float16 features{what}{note}, "
          f"batch {batch}, {steps} steps, 2-layer 128-wide text tower, each run in its own process")
    results = []
    for n in rows:
        cache = tmp / f"mem{n}"
        t0 = time.perf_counter()
        write_cache(cache, SyntheticFeatures(n, dim), SyntheticCaptions(n), mem_tower(dim), dtype="float16",
                    tokens=SyntheticTokens(n, grid, dim) if grid else None)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        wrote = time.perf_counter() - t0
        r = run_child("memtrain", cache=str(cache), run=str(tmp / f"memrun{n}"), batch=batch, steps=steps, dim=dim,
                      tokens=bool(grid))
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(tmp / f"memrun{n}", ignore_errors=True)
        results.append((n, size, wrote, r))
    print(f"\n| cache rows | on disk | written in | train run (set-up + steps) | peak RSS | steady RSS (median after "
          f"steps {WARMUP + 1}-{steps}) |")
    print("|---|---|---|---|---|---|")
    for n, size, wrote, r in results:
        print(f"| {n:,} | {size / 2**20:,.0f} MB | {wrote:.0f} s | {r['total_s']:.0f} s | {r['peak_rss_mb']:.0f} MB | "
              f"{r['steady_rss_mb']:.0f} MB |")
    ok, growth = True, float("-inf")
    (n0, _, _, small), (n1, _, _, big) = results[0], results[-1]
    for what in ("peak_rss_mb", "steady_rss_mb"):
        diff = big[what] - small[what]
        ok &= diff < limit_mb
        growth = max(growth, diff)
        print(f"{what.replace('_rss_mb', '')} RSS {n1:,} rows - {n0:,} rows: {diff:+.0f} MB -> "
              f"{'PASS' if diff < limit_mb else 'FAIL'} (limit {limit_mb:.0f} MB)")
    return ok, growth


def text_flops(length: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of the text transformer on one sequence of ``length`` tokens: the matmuls of the
    q/k/v, output and MLP projections (2 (3 + 1 + 2 mlp_ratio) width^2 a token) and of attention
    (scores and mix, 4 width length^2) in each layer but the last; the last computes the pooled token
    alone (``Block.forward_at``): keys and values of every token (4 width^2 length), then the query,
    the output projection and the MLP of one token (2 (2 + 2 mlp_ratio) width^2) and its attention
    (4 width length)."""
    full = (8 + 4 * mlp_ratio) * width ** 2 * length + 4 * width * length ** 2
    last = 4 * width ** 2 * length + (4 + 4 * mlp_ratio) * width ** 2 + 4 * width * length
    return (depth - 1) * full + last if depth else 0.0


def _bare_batches(cache: str, text, batch: int, n: int, buckets: int, device):
    """(a)'s first n batches (the same seed: the same rows and captions), ready on the device: features,
    the trainer's dynamic-padding groups, the inverse order; and the token lengths, real and padded."""
    import torch

    from littune.train.batches import CacheBatches, length_groups
    from littune.cache import EmbeddingCache

    data, out, real, padded = CacheBatches(EmbeddingCache.open(cache), batch, 0, 1, seed=0), [], [], []
    for s in range(n):
        b = data(s)
        if text.packs:  # as the trainer: one call, padded to the longest; the tower computes no padding
            groups = [(torch.arange(batch), text.tokenize(b["captions"], padding="longest"))]
        elif buckets > 1:
            groups = length_groups(text.tokenize(b["captions"], padding="longest"), buckets,
                                   padding_side=text.padding_side)
        else:
            groups = [(torch.arange(batch), text.tokenize(b["captions"]))]
        order = torch.cat([rows for rows, _ in groups])
        lengths = [int(x) for _, g in groups for x in g["attention_mask"].sum(1)]
        real += lengths
        padded += lengths if text.packs else [g["input_ids"].shape[1] for _, g in groups
                                              for _ in range(g["input_ids"].shape[0])]
        out.append((b["image_features"].to(device), [{k: v.to(device) for k, v in g.items()} for _, g in groups],
                    torch.argsort(order).to(device)))
    return out, real, padded


def child_bare(cache: str, tokenizer: str, batch: int, steps: int, buckets: int) -> dict:
    import torch
    import yaml

    from littune.train.losses import ContrastiveLoss
    from littune.towers.text import build_text_tower

    device = torch.device(device_name())
    torch.manual_seed(0)
    spec = yaml.safe_load(TEXT)
    text = build_text_tower(spec, base_dir=Path(tokenizer)).to(device)
    ready, real, padded = _bare_batches(cache, text, batch, WARMUP + steps, buckets, device)
    head_i = torch.nn.Linear(ready[0][0].shape[1], 512).to(device)
    head_t = torch.nn.Linear(spec["width"], 512).to(device)
    scale = torch.nn.Parameter(torch.tensor(2.3, device=device))
    params = [*text.parameters(), *head_i.parameters(), *head_t.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type in ("cpu", "cuda"))  # as the trainer's (littune.train.optim)
    loss_fn = ContrastiveLoss()

    def step(feats, groups, inverse):
        img = torch.nn.functional.normalize(head_i(feats), dim=-1)
        txt = torch.cat([head_t(text(**g)) for g in groups])[inverse]
        loss = loss_fn(img, torch.nn.functional.normalize(txt, dim=-1), scale)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for r in ready[:WARMUP]:
        step(*r)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for r in ready[WARMUP:]:
        step(*r)
    sync()
    secs = time.perf_counter() - t0
    w, d = spec["width"], spec["depth"]
    return {"pairs_per_s": batch * steps / secs, "peak_rss_mb": peak_memory_mb(),
            "train_flops_real": 3 * float(np.mean([text_flops(n, w, d) for n in real])),
            "train_flops_padded": 3 * float(np.mean([text_flops(n, w, d) for n in padded])),
            "real_tokens": float(np.mean(real)), "padded_tokens": float(np.mean(padded))}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    """This machine's dense fp32 matmul rate (on the GPU when there is one): the figures above scale with it."""
    import torch

    device = device_name()
    if device == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def parse_args():
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
    ap.add_argument("--memory-tokens", action=argparse.BooleanOptionalAction, default=False,
                    help="the same check for the attention head from token caches (4 x 4 x 1280 tokens; default: off)")
    ap.add_argument("--memory-token-rows", default="10000,100000")
    ap.add_argument("--memory-batch", type=int, default=256)
    ap.add_argument("--max-batch", action=argparse.BooleanOptionalAction, default=True,
                    help="the largest batch that trains, from the cache vs the tower every step (default: on)")
    ap.add_argument("--max-batch-cap-s", type=float, default=60.0, help="wall-time cap of one trial (default 60 s)")
    ap.add_argument("--mem-limit-gib", type=float, default=20.0, help="peak memory cap of one trial (default 20)")
    ap.add_argument("--max-batch-upto", type=int, default=65536,
                    help="the largest (a) batch tried (the synthetic cache has this many rows)")
    ap.add_argument("--max-batch-start", default="2048,128", help="the first batch tried for (a),(b)")
    ap.add_argument("--loaded", action=argparse.BooleanOptionalAction, default=True,
                    help="pairs/s from the cache quiet and beside a one-core CPU hog (default: on)")
    ap.add_argument("--loaded-steps", type=int, default=20)
    ap.add_argument("--loaded-rounds", type=int, default=3)
    ap.add_argument("--loaded-rows", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the --loaded runs (default: what littune train --threads defaults to)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every part: 4 steps at batch 256, no memory check, 20 s trials")
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.quick:  # smaller defaults; an option given on the command line still wins
        quick = {"steps": 4, "batches": "256", "images": 256, "memory": False, "max_batch_cap_s": 30.0,
                 "max_batch_upto": 8192, "max_batch_start": "1024,32",
                 "loaded_steps": 8, "loaded_rounds": 1, "loaded_rows": 2048}
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        kind, kw = args.child
        fn = {"train": child_train, "bare": child_bare, "memtrain": child_memtrain, "maxtrain": child_maxtrain,
              "loadtrain": child_loadtrain}[kind]
        print(json.dumps(fn(**json.loads(kw))))
        return
    import torch

    gflops = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, device {device_name()}, "
          f"{gflops:.0f} GFLOP/s fp32 matmul (to compare machines)")
    tmp = Path(tempfile.mkdtemp(prefix="littune-bench-"))
    ok, results = True, dict.fromkeys(("cache_vs_tower_every_step_b256", "cache_vs_bare_b256",
                                       "text_flop_utilisation", "max_batch_ratio", "max_batch_cache",
                                       "attention_head_rss_growth_mb", "cache_loaded_vs_quiet"), "nan")
    if args.throughput:
        results.update(throughput(tmp, args, gflops))
    if args.memory:
        ok = memory_check(tmp, [int(n) for n in args.memory_rows.split(",")], args.memory_batch, args.memory_steps)[0]
    if args.memory_tokens:
        passed, growth = memory_check(tmp, [int(n) for n in args.memory_token_rows.split(",")], args.memory_batch,
                                      args.memory_steps, grid=4)
        ok &= passed
        results["attention_head_rss_growth_mb"] = f"{growth:.0f}"
    if args.max_batch:
        results.update(max_batch(tmp, args))
    if args.loaded:
        results.update(loaded(tmp, args))
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, value in results.items():
        print(f"result: {name} = {value}")
    if not ok:
        raise SystemExit(1)


def throughput(tmp: Path, args, gflops: float) -> dict:
    from littune.cache import embed_source
    from littune.config import DataSection
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    source = make_images(tmp / "images", args.images)
    cache = tmp / "cache"
    t0 = time.perf_counter()
    embed_source(open_source(source), build_image_tower("efficientnet-lite0").eval(), cache, progress=False)
    print(f"embedded {args.images} images once in {time.perf_counter() - t0:.1f} s")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        a = run_child("train", source=str(source), cache=str(cache), run=str(tmp / f"a{batch}"), batch=batch,
                      steps=args.steps, on_the_fly=False)
        b = run_child("train", source=str(source), cache=str(cache), run=str(tmp / f"b{batch}"), batch=batch,
                      steps=max(3, args.steps // 4) + WARMUP, on_the_fly=True)
        # (c) on (a)'s batches and tokenizer, cut into the trainer's default dynamic-padding groups
        c = run_child("bare", cache=str(cache), tokenizer=str(tmp / f"a{batch}" / "tokenizer"), batch=batch,
                      steps=args.steps, buckets=DataSection().text_buckets)
        rows.append((batch, a, b, c))
    print_throughput(rows, gflops)
    out = {}
    for batch, a, b, c in rows:
        if batch == 256:
            out = {"cache_vs_tower_every_step_b256": f"{a['pairs_per_s'] / b['pairs_per_s']:.2f}",
                   "cache_vs_bare_b256": f"{a['pairs_per_s'] / c['pairs_per_s']:.3f}",
                   "text_flop_utilisation": f"{a['pairs_per_s'] * c['train_flops_real'] / (gflops * 1e9):.4f}"}
    return out


def print_throughput(rows, gflops: float) -> None:
    print(f"\nsteady-state pairs/s (first {WARMUP} steps left out of each)")
    print(f"\n| batch | (a) cache pairs/s | (b) tower every step | (c) bare compute | (a)/(c) | (a)/(b) | "
          f"{memory_name()} a / b / c (MB) |")
    print("|---|---|---|---|---|---|---|")
    for batch, a, b, c in rows:
        print(f"| {batch} | {a['pairs_per_s']:.1f} | {b['pairs_per_s']:.1f} | {c['pairs_per_s']:.1f} | "
              f"{a['pairs_per_s'] / c['pairs_per_s']:.2f} | {a['pairs_per_s'] / b['pairs_per_s']:.1f} | "
              f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |")
    print("\n(with the first steps counted too: " + "; ".join(
        f"batch {batch}: (a) {a['pairs_per_s_all_steps']:.1f}, (b) {b['pairs_per_s_all_steps']:.1f}"
        for batch, a, b, _ in rows) + ")")
    print(f"\ntext tower FLOPs per pair (forward + backward = 3x forward), against {gflops:.0f} GFLOP/s fp32 matmul:")
    for batch, a, _, c in rows:
        print(f"  batch {batch}: {c['real_tokens']:.1f} real tokens a caption, {c['padded_tokens']:.1f} with the "
              f"dynamic padding; {c['train_flops_real'] / 1e6:.0f} MFLOP on the real tokens "
              f"({c['train_flops_padded'] / 1e6:.0f} as computed); utilisation on the real tokens: (a) "
              f"{a['pairs_per_s'] * c['train_flops_real'] / (gflops * 1e9):.3f}, (c) "
              f"{c['pairs_per_s'] * c['train_flops_real'] / (gflops * 1e9):.3f}; as computed (c) "
              f"{c['pairs_per_s'] * c['train_flops_padded'] / (gflops * 1e9):.3f}")


# -- beside a busy core: pairs/s quiet and next to a one-core CPU hog ----------------------------------------
#: (name, setting, batch): the default LL (the two heads train on cached image and text features) and Lu
#: (the 6x384 text transformer trains), each from the same synthetic cache
LOADED = (("heads (LL)", "LL", 1024), ("text tower (Lu)", "Lu", 64))
HOG = "while True:\n    pass\n"  # one core's worth of busy work, as another user's job would be


def child_loadtrain(cache: str, run: str, setting: str, batch: int, steps: int, threads: int | None) -> dict:
    """Train from ``cache`` with the threads ``littune train --threads`` would set; the steady rate."""
    import torch

    from littune.commands.train import set_threads
    from littune.config import load_config
    from littune.train.trainer import Trainer

    overrides = [f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}", f"steps={steps}",
                 f"model.setting={setting}", "progress=false", "log_every=1", "checkpoint_every=0",
                 f"model.text_tower={TEXT}", f"model.image_tower={json.dumps(mem_tower(1280))}",
                 "schedule.warmup_steps=2"]
    cfg = load_config(overrides=overrides)
    set_threads(cfg, threads)
    Trainer(cfg).run()
    secs = [batch / json.loads(ln)["pairs_per_s"] for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {"pairs_per_s": batch * (len(secs) - WARMUP) / sum(secs[WARMUP:]), "threads": torch.get_num_threads(),
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "slowest_step_s": max(secs[WARMUP:])}


def beside_hog(kw: dict) -> dict:
    """``loadtrain`` in its own process while another process busy-loops on one core (killed after)."""
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        return run_child("loadtrain", **kw)
    finally:
        hog.kill()
        hog.wait()


def loaded(tmp: Path, args) -> dict:
    """Each workload of :data:`LOADED` quiet, then beside the hog, ``--loaded-rounds`` times in turn. Each
    round's ratio compares two runs a minute apart, so the rest of the machine's load, which drifts over
    minutes, weighs on both alike; the median over the rounds is the workload's ratio, the lower one the result."""
    import shutil

    from littune.cache import write_cache

    cache = tmp / "loadcache"
    write_cache(cache, SyntheticFeatures(args.loaded_rows, 1280), PhotoCaptions(args.loaded_rows), mem_tower(1280),
                dtype="float16")
    print(f"\nbeside a busy core: {args.loaded_steps} steps from a {args.loaded_rows:,}-row cache of 1280-d features, "
          f"quiet, then beside a process busy-looping on one core; each run in its own process, {args.loaded_rounds} "
          f"rounds; threads {args.threads or 'littune train default'}")
    rows = []
    for name, setting, batch in LOADED:
        kw = {"cache": str(cache), "run": str(tmp / "loadrun"), "setting": setting, "batch": batch,
              "steps": args.loaded_steps + WARMUP, "threads": args.threads}
        rounds = []
        for _ in range(args.loaded_rounds):
            pair = []
            for measure in (lambda: run_child("loadtrain", **kw), lambda: beside_hog(kw)):
                shutil.rmtree(tmp / "loadrun", ignore_errors=True)
                load = os.getloadavg()[0]
                pair.append(measure())
                print(f"  {name}, {'beside the hog' if len(pair) == 2 else 'quiet'}: {pair[-1]['pairs_per_s']:.1f} "
                      f"pairs/s (slowest step {pair[-1]['slowest_step_s']:.2f} s, load average {load:.2f} before)",
                      flush=True)
            rounds.append(pair)
        rows.append((name, batch, rounds))
    print("\n| training | batch | torch threads | OMP_WAIT_POLICY | quiet pairs/s (median) | beside the hog (median) | "
          "loaded / quiet, each round | median |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for name, batch, rounds in rows:
        each = [b["pairs_per_s"] / q["pairs_per_s"] for q, b in rounds]
        ratios.append(float(np.median(each)))
        q0, quiet, busy = rounds[0][0], [q["pairs_per_s"] for q, _ in rounds], [b["pairs_per_s"] for _, b in rounds]
        print(f"| {name} | {batch} | {q0['threads']} | {q0['wait_policy']} | {np.median(quiet):.1f} | "
              f"{np.median(busy):.1f} | {', '.join(f'{r:.2f}' for r in each)} | {ratios[-1]:.2f} |")
    print("(besides the torch threads: the trainer's one batch-making thread)")
    return {"cache_loaded_vs_quiet": f"{min(ratios):.2f}"}


# -- the largest batch that trains -------------------------------------------------------------------
MAX_TEXT = "{type: transformer, width: 128, depth: 2, heads: 2, context_length: 32, vocab_size: 8000}"
MICRO = 512  # (a)'s micro-batch: grad_accum = batch / MICRO above it


class PhotoCaptions:
    """Two captions per image in make_images' form ("a photo of a" and 4 of its words): (a)'s text = (b)'s."""

    WORDS = ["cat", "coffee", "cup", "animal", "drink", "table", "fur", "whiskers", "espresso", "saucer"]

    def __init__(self, n: int):
        self.words = np.random.default_rng(3).integers(0, len(self.WORDS), size=(n, 2, 4), dtype=np.int8)

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> list[str]:
        return ["a photo of a " + " ".join(self.WORDS[w] for w in self.words[i, j]) for j in range(2)]


def child_maxtrain(data: list, run: str, batch: int, accum: int, chunk: int, limit_mb: float) -> dict:
    import torch

    from littune.config import load_config
    from littune.train.trainer import Trainer

    if torch.cuda.is_available():  # an allocation past the limit is an out-of-memory error
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_mb * 2**20 / total))
    overrides = [*data, f"run_dir={run}", f"data.batch_size={batch}", "steps=2", f"grad_accum={accum}",
                 f"model.loss_chunk={chunk}", "progress=false", "log_every=1", "checkpoint_every=0",
                 "model.setting=Lu", f"model.text_tower={MAX_TEXT}", "schedule.warmup_steps=1"]
    t0 = time.perf_counter()
    Trainer(load_config(overrides=overrides)).run()
    return {"peak_mb": peak_memory_mb(), "total_s": time.perf_counter() - t0}


def _child_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def trial(kw: dict, cap_s: float, limit_mb: float, tmp: Path) -> tuple[bool, str]:
    """Train 2 steps in a fresh process: (trains?, what happened)."""
    import shutil

    with open(tmp / "trial.out", "w+") as out, open(tmp / "trial.err", "w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "maxtrain", json.dumps({**kw, "limit_mb": limit_mb})],
                                stdout=out, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        t0, why = time.perf_counter(), None
        while proc.poll() is None:
            if time.perf_counter() - t0 > cap_s:
                why = f"over the {cap_s:.0f} s cap"
            elif device_name() == "cpu" and _child_rss_mb(proc.pid) > limit_mb:
                why = f"RSS over {limit_mb / 1024:.0f} GiB"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        shutil.rmtree(kw["run"], ignore_errors=True)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if why:
        return False, why
    if proc.returncode:
        last = (stderr.strip().splitlines() or ["?"])[-1][:160]
        oom = proc.returncode == -9 or "out of memory" in stderr.lower()
        return False, "out of memory" if oom else f"exit {proc.returncode}: {last}"
    r = json.loads(stdout.strip().splitlines()[-1])
    if r["peak_mb"] > limit_mb:
        return False, f"peak {r['peak_mb']:.0f} MB over the limit"
    return True, f"{r['total_s']:.0f} s, {memory_name()} {r['peak_mb']:.0f} MB"


def largest_batch(name: str, kwargs, start: int, unit: int, upto: int, try_one) -> tuple[int, str]:
    """Double from ``start`` until a trial fails (halve first if ``start`` fails), then try the midpoint."""
    def ok(b):
        good, note = try_one(kwargs(b))
        print(f"  {name}: batch {b:,}: {'trains' if good else 'fails'} ({note})", flush=True)
        return good, note

    good_b, bad_b, why = 0, None, f"reached --max-batch-upto {upto}"
    b = start
    while b <= upto:
        good, note = ok(b)
        if not good:
            bad_b, why = b, note
            break
        good_b, b = b, 2 * b
    while not good_b and b // 2 >= unit:  # even the start failed
        b //= 2
        good, note = ok(b)
        good_b = b if good else 0
    mid = (good_b + bad_b) // 2 // unit * unit if good_b and bad_b else 0
    if good_b < mid < bad_b and ok(mid)[0]:
        good_b = mid
    return good_b, why


def max_batch(tmp: Path, args) -> dict:
    from littune.cache import write_cache
    from littune.config import ModelSection

    limit_mb = args.mem_limit_gib * 1024
    start_a, start_b = (int(x) for x in args.max_batch_start.split(","))
    print(f"\nlargest global batch that trains: 2 steps, {memory_name()} under {args.mem_limit_gib:g} GiB, "
          f"under {args.max_batch_cap_s:.0f} s a trial (start, set-up, steps, export); text tower {MAX_TEXT}")
    cache = tmp / "maxcache"
    write_cache(cache, SyntheticFeatures(args.max_batch_upto, 1280), PhotoCaptions(args.max_batch_upto),
                mem_tower(1280), dtype="float16")
    chunk = ModelSection().loss_chunk
    a_data = [f"data.cache={cache}", f"model.image_tower={json.dumps(mem_tower(1280))}"]

    def a_kwargs(b):
        return {"data": a_data, "run": str(tmp / "maxrun"), "batch": b, "accum": max(1, b // MICRO), "chunk": chunk}

    def b_kwargs(b):
        source = make_images(tmp / "maximages", b)  # the images a batch of b needs (written once)
        return {"data": [f"data.source={source}", "data.on_the_fly=true", "data.workers=1"],
                "run": str(tmp / "maxrun"), "batch": b, "accum": 1, "chunk": 0}

    def try_one(kw):
        return trial(kw, args.max_batch_cap_s, limit_mb, tmp)

    print(f"(a) from the cache: loss_chunk {chunk}, grad_accum = batch / {MICRO} above {MICRO}")
    a, why_a = largest_batch("(a)", a_kwargs, start_a, MICRO, args.max_batch_upto, try_one)
    print("(b) locked EfficientNet-Lite0 every step: the whole batch in one pass, grad_accum 1, full logit matrix")
    b, why_b = largest_batch("(b)", b_kwargs, start_b, 16, 1 << 30, try_one)
    ratio = a / b if b else float("nan")
    bound = "at least " if why_a.startswith("reached") else ""  # (a) never failed: its true limit is higher
    print(f"\n| | largest batch | stopped by |\n|---|---|---|\n| (a) from the cache | {a:,} | {why_a} |\n"
          f"| (b) tower every step | {b:,} | {why_b} |\n\n(a)/(b) = {bound}{ratio:.1f} (the paper's Table 7: 2448/146 = 16.8)")
    return {"max_batch_ratio": f"{ratio:.1f}", "max_batch_cache": str(a)}


if __name__ == "__main__":
    main()
