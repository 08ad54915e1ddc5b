"""The main job behind `make quickstart`: LiT on real emoji drawn by people, with honest held-out numbers.

1. **Data** -- ``littune data emoji``: about 1,900 emoji concepts in ten design families, with two
   families (Twemoji, OpenMoji) and 10% of the concepts never trained on.
2. **Embed once** -- ``littune embed``: the locked ImageNet EfficientNet-Lite0 runs over every image
   one time; training never loads it again.
3. **Train** ``Lu`` -- ``littune train``: a text transformer from scratch, from the cache.
4. **Evaluate** -- zero-shot classification (prompt ensemble) of the held-out designs, the held-out
   concepts and both at once, and text<->image retrieval on their captions, next to two baselines:
   chance, and an image-only prototype classifier (the mean training-design embedding of each concept,
   nearest prototype), the ceiling a locked tower allows for concepts seen in training.

Prints the results table and writes it (``results.md``, ``results.json``) with the run directory
(model, plots, metrics) under ``out/quickstart`` (``out/quickstart-quick`` with ``QUICK=1``: 200
concepts and fewer steps, a few minutes). Everything is reused on a second run.

    python -m littune.quickstart [--quick] [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SPLITS = {  # eval split -> what it tests
    "heldout_designs": "designs never seen (Twemoji, OpenMoji), all concepts",
    "heldout_concepts": "concepts never seen, training designs",
    "heldout_both": "unseen concepts in unseen designs",
}
TEXT_TOWER = {"type": "transformer", "width": 256, "depth": 4, "heads": 4, "context_length": 24,
              "vocab_size": 8000, "tokenizer": "bpe", "pooling": "last"}
QUICK_CONCEPTS = 200


def _say(msg: str) -> None:
    print(f"[littune] {msg}", flush=True)


# -- data and caches ----------------------------------------------------------------------------
def prepare(out: Path, quick: bool, tower: str | dict = "efficientnet-lite0", progress: bool = True,
            **build_options) -> dict:
    """Build (or reuse) the emoji data and the embedding caches of ``tower``; return their paths.

    ``build_options`` go to :func:`littune.datasets.emoji.build_emoji` (tests pass a fake
    ``packages`` folder and a small ``size``).
    """
    from .cache import embed_source
    from .datasets.emoji import build_emoji
    from .towers.image import build_image_tower

    data = out / ("data/emoji-quick" if quick else "data/emoji")
    _say(f"data: littune data emoji --out {data}" + (f" --limit-concepts {QUICK_CONCEPTS}" if quick else ""))
    manifest = build_emoji(data, limit_concepts=QUICK_CONCEPTS if quick else None, **build_options)
    tag = tower if isinstance(tower, str) else tower.get("name", tower.get("type", "tower"))
    caches = out / "caches" / f"{data.name}-{tag}"
    paths = {"data": data, "manifest": manifest, "train": caches / "train", "eval": {}}
    net = None
    jobs = [("train", data / "train.csv", caches / "train")]
    jobs += [(s, data / "eval" / f"retrieval_{s}.csv", caches / s) for s in SPLITS
             if (data / "eval" / f"retrieval_{s}.csv").is_file()]
    for name, source, cache in jobs:
        if not (cache / "manifest.json").is_file():
            net = net or build_image_tower(tower).eval()
            _say(f"embed: littune embed {source} --tower {tag} --out {cache}")
            embed_source(source, net, cache, progress=progress)
        if name != "train":
            paths["eval"][name] = {"cache": cache, "classnames": data / "eval" / name / "classnames.txt"}
    return paths


# -- baselines ------------------------------------------------------------------------------------
def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _all_features(cache) -> np.ndarray:
    return np.asarray(cache.features(np.arange(len(cache))), dtype=np.float32)


def prototype_baseline(train_cache_dir: Path, eval_cache_dir: Path) -> dict | None:
    """Image-only nearest-prototype accuracy on the eval images whose concept was trained on.

    A concept's prototype is the mean of its training images' (centred, normalised) locked features;
    an eval image is classified to the nearest prototype among the eval split's seen concepts. No text
    is involved: it is what the locked image features alone can tell apart. ``None`` when the split
    holds no trained concept.
    """
    from .cache import EmbeddingCache

    train, test = EmbeddingCache.open(train_cache_dir), EmbeddingCache.open(eval_cache_dir)
    f_train = _all_features(train)
    mean = f_train.mean(0, keepdims=True)
    f_train = _normalised(_normalised(f_train) - _normalised(mean))
    concept = np.array([Path(train.key(i)).stem for i in range(len(train))])  # images/<design>/<concept>.png
    test_concept = [Path(test.key(i)).parent.name for i in range(len(test))]  # <split>/<concept>/<design>.png
    classes = sorted(set(test_concept) & set(concept.tolist()))
    if not classes:
        return None
    protos = _normalised(np.stack([f_train[concept == c].mean(0) for c in classes]))
    keep = [i for i, c in enumerate(test_concept) if c in set(classes)]
    f_test = _normalised(_normalised(_all_features(test)[keep]) - _normalised(mean))
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[test_concept[i]] for i in keep])
    scores = f_test @ protos.T
    ranks = (scores > scores[np.arange(len(keep)), labels][:, None]).sum(1)
    return {"acc1": float(np.mean(ranks < 1)), "acc5": float(np.mean(ranks < 5)),
            "classes": len(classes), "images": len(keep)}


# -- training and the table -----------------------------------------------------------------------
def train_overrides(paths: dict, run_dir: Path, steps: int, batch: int = 256, text_tower: dict | None = None,
                    embed_dim: int = 256, image_tower: str | dict = "efficientnet-lite0",
                    validations: int = 4) -> list[str]:
    """The ``littune train --set`` overrides of the quickstart's ``Lu`` run (validated ``validations``
    times, the last at the end)."""
    zs = [{"name": f"{s}", "cache": str(v["cache"]), "classnames": str(v["classnames"]), "templates": "emoji"}
          for s, v in paths["eval"].items()]
    rt = [{"name": f"{s}_retrieval", "cache": str(v["cache"]), "group_by_folder": True}
          for s, v in paths["eval"].items()]
    return [
        "model.setting=Lu", f"model.image_tower={json.dumps(image_tower)}", f"data.source={paths['data'] / 'train.csv'}", f"data.cache={paths['train']}",
        f"run_dir={run_dir}", f"steps={steps}", f"data.batch_size={batch}", "optim.lr=1e-3",
        "optim.weight_decay=1e-4", f"schedule.warmup_steps={max(1, steps // 10)}", "log_every=10",
        f"checkpoint_every={max(50, steps // 4)}", f"val.every={max(1, -(-steps // max(1, validations)))}",
        f"model.text_tower={json.dumps(text_tower or TEXT_TOWER)}", f"model.embed_dim={embed_dim}",
        f"val.zeroshot={json.dumps(zs)}", f"val.retrieval={json.dumps(rt)}",
    ]


def results_rows(paths: dict, metrics: dict, label: str = "Lu") -> list[dict]:
    """One row per eval split: sizes, chance, prototype ceiling and the model's metrics."""
    from .eval.sets import read_classnames

    rows = []
    for split, info in paths["eval"].items():
        if split not in metrics:
            continue
        n_classes = len(read_classnames(info["classnames"]))
        m, r = metrics[split], metrics.get(f"{split}_retrieval", {})
        proto = prototype_baseline(paths["train"], info["cache"])
        n_images = paths["manifest"]["counts"]["eval"][split]["images"]
        rows.append({"split": split, "tests": SPLITS[split], "images": n_images, "classes": n_classes,
                     "chance_acc1": 1 / n_classes, "prototype": proto, "model": label,
                     "acc1": m["acc1"], "acc5": m["acc5"], "mean_per_class_recall": m["mean_per_class_recall"],
                     "image_retrieval_recall@1": r.get("image_retrieval_recall@1"),
                     "image_retrieval_recall@5": r.get("image_retrieval_recall@5"),
                     "text_retrieval_recall@1": r.get("text_retrieval_recall@1"),
                     "text_retrieval_recall@5": r.get("text_retrieval_recall@5")})
    return rows


def _f(x) -> str:
    """Three decimals; two significant digits below 0.01, so that chance (e.g. 0.0005) does not round away."""
    if x is None:
        return "n/a"
    return f"{x:.2g}" if 0 < abs(x) < 0.01 else f"{x:.3f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| held-out split | images | classes | chance top-1 | image-only prototype top-1 (seen concepts) | "
            "zero-shot top-1 | top-5 | text→image R@1 | R@5 | image→text R@1 | R@5 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p = r["prototype"]
        proto = f"{p['acc1']:.3f} ({p['classes']} classes)" if p else "n/a (no concept seen)"
        lines.append(f"| {r['split']}: {r['tests']} | {r['images']} | {r['classes']} | {r['chance_acc1']:.4f} | "
                     f"{proto} | {_f(r['acc1'])} | {_f(r['acc5'])} | {_f(r['image_retrieval_recall@1'])} | "
                     f"{_f(r['image_retrieval_recall@5'])} | {_f(r['text_retrieval_recall@1'])} | "
                     f"{_f(r['text_retrieval_recall@5'])} |")
    return "\n".join(lines)


def _commit() -> str:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m littune.quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"),
                    help=f"{QUICK_CONCEPTS} concepts and fewer steps: a few minutes (also QUICK=1)")
    ap.add_argument("--out", default=None, help="output folder (default out/quickstart or out/quickstart-quick)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 400, quick 100)")
    args = ap.parse_args(argv)
    from .trainer import Trainer
    from .config import load_config

    t0 = time.time()
    out = Path(args.out or ("out/quickstart-quick" if args.quick else "out/quickstart"))
    steps = args.steps or (100 if args.quick else 400)
    batch = 128 if args.quick else 256
    paths = prepare(out, args.quick)
    t_data = time.time() - t0
    run_dir = out / "run"
    _say(f"train: littune train --set model.setting=Lu --set data.cache={paths['train']} --set steps={steps} "
         f"--set run_dir={run_dir} ... (resolved configuration: {run_dir / 'config.yaml'})")
    cfg = load_config(overrides=train_overrides(paths, run_dir, steps, batch=batch,
                                                validations=2 if args.quick else 3))
    if (run_dir / "results.json").is_file() and (run_dir / "model").is_dir():
        _say(f"train: {run_dir} is finished; reusing it (delete it to train again)")
    else:
        Trainer(cfg).run()
    t_train = time.time() - t0 - t_data
    metrics = json.loads((run_dir / "results.json").read_text())
    rows = results_rows(paths, metrics)
    c = paths["manifest"]["counts"]
    table = markdown_table(rows)
    commit = _commit()
    header = (f"LiT `Lu` on emoji: locked ImageNet EfficientNet-Lite0, text transformer from scratch "
              f"({TEXT_TOWER['depth']}x{TEXT_TOWER['width']}), {steps} steps of {batch} pairs; trained on "
              f"{c['train_images']} images / {c['train_rows']} captions of {c['train_concepts']} concepts in "
              f"{len(paths['manifest']['train_designs'])} designs. Zero-shot: prompt ensemble 'emoji'; retrieval: "
              f"any design of the caption's concept counts. littune commit {commit}, "
              f"{time.time() - t0:.0f} s in all (data + embedding {t_data:.0f} s, training + evaluation "
              f"{t_train:.0f} s) on {os.cpu_count()} cores.")
    (out / "results.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"header": header, "rows": rows, "steps": steps, "batch": batch,
                                                  "commit": commit, "seconds": time.time() - t0}, indent=2))
    print("\n" + header + "\n\n" + table + "\n")
    print(f"model: {run_dir / 'model'}   plots: {run_dir / 'plots'}   table: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
