"""Training throughput: from the embedding cache vs running the locked tower every step vs bare compute.

EfficientNet-Lite0 (locked) + a 6-layer 384-wide text transformer, batch 64 and 256, 2 CPU cores:

  (a) `littune train` from the embedding cache (the LiT way: the image model is never run),
  (b) the same model with the locked image tower run on every step on decoded images
      (what open_clip's --lock-image does),
  (c) the bare compute limit: text forward + backward + loss + optimiser step on ready tensors.

Prints pairs/s and peak RSS of each (each measured in its own process), the ratios (a)/(c) and (a)/(b),
(The 10k-row vs 1M-row cache memory check is not written yet.)

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--batches 64,256]
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_train(source: str, cache: str, run: str, batch: int, steps: int, on_the_fly: bool) -> dict:
    from littune.config import load_config
    from littune.trainer import Trainer

    overrides = [f"data.source={source}", f"data.cache={cache}", f"run_dir={run}", f"data.batch_size={batch}",
                 f"steps={steps}", "progress=false", f"log_every={steps}", "checkpoint_every=0",
                 f"model.text_tower={TEXT}", "schedule.warmup_steps=2", f"data.on_the_fly={str(on_the_fly).lower()}",
                 "data.workers=1"]
    trainer = Trainer(load_config(overrides=overrides))
    t0 = time.perf_counter()
    trainer.run()
    total = time.perf_counter() - t0
    rec = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    # Steady-state rate: the last logged window (all steps but set-up), from the trainer's own log.
    return {"pairs_per_s": rec[-1]["pairs_per_s"], "total_s": total, "peak_rss_mb": peak_rss_mb()}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        kind, kw = args.child
        fn = {"train": child_train, "bare": child_bare}[kind]
        print(json.dumps(fn(**json.loads(kw))))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    tmp = Path(tempfile.mkdtemp(prefix="littune-bench-"))
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
                      steps=max(3, args.steps // 4), on_the_fly=True)
        c = run_child("bare", batch=batch, steps=args.steps)
        rows.append((batch, a, b, c))
    print("\n| batch | (a) cache pairs/s | (b) tower every step | (c) bare compute | (a)/(c) | (a)/(b) | peak RSS a / b / c (MB) |")
    print("|---|---|---|---|---|---|---|")
    for batch, a, b, c in rows:
        print(f"| {batch} | {a['pairs_per_s']:.1f} | {b['pairs_per_s']:.1f} | {c['pairs_per_s']:.1f} | "
              f"{a['pairs_per_s'] / c['pairs_per_s']:.2f} | {a['pairs_per_s'] / b['pairs_per_s']:.1f} | "
              f"{a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
