"""The end-to-end smoke job behind `make quickstart` (until the emoji quickstart lands).

Makes a small captioned image set (coloured shapes on noisy backgrounds, drawn here), embeds it once
with the locked, real ImageNet EfficientNet-Lite0, trains an `Lu` model from the cache, and evaluates
zero-shot classification of colours on held-out images. Prints a results table; writes the run
(plots, model directory) under `out/quickstart/`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (15, 15, 15), "purple": (140, 40, 170), "orange": (250, 140, 20), "pink": (250, 150, 200)}
SHAPES = ("circle", "square", "triangle")


def draw(root: Path, split: str, n_per: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(n_per):
                bg = tuple(int(v) for v in rng.integers(150, 256, 3))
                img = Image.new("RGB", (160, 160), bg)
                d = ImageDraw.Draw(img)
                s = int(rng.integers(50, 110))
                x, y = int(rng.integers(5, 155 - s)), int(rng.integers(5, 155 - s))
                fill = tuple(int(np.clip(v + rng.integers(-25, 25), 0, 255)) for v in rgb)
                if shape == "circle":
                    d.ellipse((x, y, x + s, y + s), fill=fill)
                elif shape == "square":
                    d.rectangle((x, y, x + s, y + s), fill=fill)
                else:
                    d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=fill)
                rel = f"{split}/{colour}/{shape}_{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img.save(root / rel)
                rows.append((rel, colour, shape))
    return rows


def main() -> int:
    from .cache import embed_source
    from .config import load_config
    from .data.sources import open_source
    from .towers.image import build_image_tower
    from .trainer import Trainer

    out = Path("out/quickstart")
    data = out / "data"
    t0 = time.time()
    if not (data / "train.csv").exists():
        train = draw(data, "train", 6, 0)
        draw(data, "test", 3, 1)
        lines = ["image,caption"]
        for rel, colour, shape in train:
            lines += [f"{rel},a {colour} {shape}", f"{rel},{shape} in {colour}", f"{rel},a photo of something {colour}"]
        (data / "train.csv").write_text("\n".join(lines) + "\n")
    tower = build_image_tower("efficientnet-lite0").eval()
    embed_source(open_source(data / "train.csv"), tower, out / "cache_train", progress=True)
    embed_source(open_source(data / "test"), tower, out / "cache_test", progress=True)
    cfg = load_config(overrides=[
        f"data.source={data / 'train.csv'}", f"data.cache={out / 'cache_train'}", f"run_dir={out / 'run'}",
        "steps=300", "data.batch_size=64", "optim.lr=1e-3", "schedule.warmup_steps=30", "log_every=20",
        "checkpoint_every=100", "model.text_tower={type: transformer, width: 128, depth: 2, heads: 4, "
        "context_length: 16, vocab_size: 500}", "model.embed_dim=128",
        "val.zeroshot=[{name: test_colours, cache: " + str(out / "cache_test") + ", templates: none}]",
    ])
    Trainer(cfg).run()
    results = json.loads((out / "run" / "results.json").read_text())
    m = results["test_colours"]
    print("\n| task (held-out images) | classes | chance | top-1 | top-5 | mean per-class recall |")
    print("|---|---|---|---|---|---|")
    print(f"| zero-shot colour, Lu, EfficientNet-Lite0 locked | {len(COLOURS)} | {1 / len(COLOURS):.3f} | "
          f"{m['acc1']:.3f} | {m['acc5']:.3f} | {m['mean_per_class_recall']:.3f} |")
    print(f"\nmodel: {out / 'run' / 'model'}  plots: {out / 'run' / 'plots'}  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
