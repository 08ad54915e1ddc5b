"""Measure a trained model: zero-shot classification or image-text retrieval.

`littune eval zeroshot DATASET --model DIR` classifies every image of a class folder
(root/<class>/*.png, optional classnames.txt with display names in folder order) or of a CSV with
image and label columns, against prompts made from the class names and a template set (--templates: one
of the shipped sets or a file with one template per line holding {}). It reports
acc1, acc5 and mean_per_class_recall; --per-class adds a per-class table, --confusion a PNG.

`littune eval retrieval SOURCE --model DIR` ranks images for every caption and captions for every
image (COCO protocol: several captions per image; an image query is right if any of its captions is
in the top K) and reports text→image R@K (each caption a query over the images; image_retrieval_recall@K
in the --out JSON) and image→text R@K (each image a query over the captions; text_retrieval_recall@K).

`littune eval pointing FOLDER --model DIR` plays the pointing game (littune.eval.pointing): collages of
2-4 images of a class folder (held-out designs) on a white canvas, and for each image's class name,
does its heat map peak inside the image's box? It reports the hit rate against always pointing at
the centre and at a random cell; --out writes the numbers and every trial, --figure the first collages.

With a locked image tower, --cache CACHE_DIR (from `littune embed` over the same folder or file)
reads the image features instead of running the image model; a cache of another source (other
images, even under the same names) or tower is refused unless --allow-stale-cache. Without --cache, a
locked tower's features that embedding caches hold for the same image files (computed with the same
tower, pre-processing and runtime, files unchanged since) are read from them, as --cache would, and only
the other images go through the tower (--no-reuse runs it on every image). --out writes the results as JSON in
CLIP_benchmark's layout ({"dataset", "model", "task", "metrics": {...}}).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import add_trust_code

HELP = "zero-shot classification and image-text retrieval metrics"
EXAMPLE = "littune eval zeroshot data/pets --model runs/lu/model --templates imagenet --out pets.json"
ZEROSHOT_EXAMPLE = ("littune eval zeroshot data/pets --model runs/lu/model --templates short "
                    "--per-class --confusion pets_confusion.png --out pets.json")
POINTING_EXAMPLE = ("littune eval pointing data/emoji/eval/heldout_designs --model runs/lu/model --collages 200 "
                    "--out pointing.json --figure pointing.png")
RETRIEVAL_EXAMPLE = ("littune eval retrieval data/coco_val.csv --model runs/lu/model --cache caches/coco_val "
                     "--out coco.json")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, metavar="DIR",
                   help="a model directory (save_pretrained / littune train)")
    p.add_argument("--cache", metavar="DIR", help="read image features from this embedding cache (locked image tower)")
    p.add_argument("--allow-stale-cache", action="store_true",
                   help="use --cache even if it was built from another source or tower (a warning says which)")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="run the image tower on every image (by default a locked tower's features that embedding "
                        "caches hold for the same image files, computed the same way, are read from them)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--out", "-o", metavar="FILE", help="write the results JSON here")
    p.add_argument("--image-column", help="CSV: the image column (default: found by name)")
    p.add_argument("--image-root", metavar="DIR",
                   help="CSV: base folder of relative image paths (default: the CSV's folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_trust_code(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.templates import sets_help

    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    z = sub.add_parser("zeroshot", help="zero-shot classification: acc1, acc5, mean per-class recall",
                       description="Zero-shot classification of a class folder or a label CSV.",
                       epilog=f"example:\n  {ZEROSHOT_EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    z.add_argument("dataset", metavar="DATASET",
                   help="a class folder (root/<class>/*.png) or a CSV with image,label columns")
    _common(z)
    z.add_argument("--templates", "-t", default="short",
                   help=f"prompt templates: {sets_help()}")
    z.add_argument("--classnames", metavar="FILE",
                   help="class display names, one per line in class-folder / index order")
    z.add_argument("--label-column", help="CSV: the label column (default: label, class, category...)")
    z.add_argument("--per-class", action="store_true", help="print (and save) a per-class table")
    z.add_argument("--confusion", metavar="PNG", help="draw the confusion matrix to this PNG file")
    r = sub.add_parser("retrieval", help="image-text retrieval: recall@K both ways (COCO protocol)",
                       description="Image-text retrieval on captioned images "
                                   "(CSV image,caption; JSONL; COCO; tar shards).",
                       epilog=f"example:\n  {RETRIEVAL_EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("dataset", metavar="SOURCE",
                   help="captioned images: a CSV image,caption (several rows per image allowed), "
                        "JSONL, COCO captions JSON, tar shards or a folder with .txt captions")
    _common(r)
    r.add_argument("--caption-column", help="CSV: the caption column (default: found by name)")
    r.add_argument("--ks", default="1,5,10", help="the K of recall@K, comma-separated (default 1,5,10)")
    _add_pointing(sub)


def _add_pointing(sub) -> None:
    p = sub.add_parser("pointing", help="the pointing game: does each name's heat map peak on its image?",
                       description="Collages of 2-4 images of a class folder; does each class name's heat map peak "
                                   "inside its image? (littune.eval.pointing)",
                       epilog=f"example:\n  {POINTING_EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", metavar="FOLDER", help="a class folder (root/<class>/*.png, optional classnames.txt)")
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="a model directory")
    p.add_argument("--collages", "-n", type=int, default=200, help="collages to play (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the collages' seed (default 0)")
    p.add_argument("--canvas", type=int, default=448, help="the collages' side in pixels (default 448)")
    p.add_argument("--templates", "-t", default="emoji", help="prompt templates for the names (default emoji)")
    p.add_argument("--batch-size", type=int, default=16, help="collages per forward pass (default 16)")
    p.add_argument("--out", "-o", metavar="FILE", help="write the numbers and every trial as JSON here")
    p.add_argument("--figure", metavar="PNG", help="draw the first --show collages and their maps to this PNG")
    p.add_argument("--show", type=int, default=4, help="collages in the figure (default 4)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    add_trust_code(p)


def _ks(text: str) -> list[int]:
    from ..errors import LittuneError

    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LittuneError(f"--ks must be comma-separated integers, not {text!r}") from None
    if not ks or min(ks) < 1:
        raise LittuneError(f"--ks needs positive integers, not {text!r}")
    return ks


def _report_skipped(skipped, problems) -> None:
    items = list(problems) + list(skipped)
    if items:
        where, why = items[0]
        print(f"skipped {len(items)} image(s) or row(s); first: {where}: {why}", file=sys.stderr)


def _dump(path: str, dataset: str, model_dir: str, model, task: str, metrics: dict, extra: dict) -> None:
    from .. import __version__

    out = {
        "dataset": dataset,
        "model": f"littune-{model.config.setting}",
        "pretrained": str(model_dir),
        "task": task,
        "metrics": metrics,
        "language": "en",
        "littune": {"version": __version__, **extra},
    }
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results written to {p}")


def _print_metrics(metrics: dict) -> None:
    """One line a metric: its name for a person (a retrieval recall with its direction), the value, the key."""
    from ..eval.names import for_stream, metric_label

    names = {k: for_stream(metric_label(k), sys.stdout) for k in metrics}
    width = max(len(n) for n in names.values())
    for k, v in metrics.items():
        print(f"{names[k]:<{width}}  {v:.4f}  ({k})")


def run(args) -> int:
    from ..model.two_towers import LiTModel

    if getattr(args, "figure", None):
        from ..plots import pyplot

        pyplot("--figure")  # before the model loads: a missing extra is one line at once
    model = LiTModel.from_pretrained(args.model, trust_code=args.trust_code)
    if args.task == "zeroshot":
        return _zeroshot(args, model)
    if args.task == "pointing":
        return _pointing(args, model)
    return _retrieval(args, model)


def _cache(args, model, dataset):
    """``--cache``, opened and checked: the model's image tower and the dataset's source (the images looked
    up by name must be the ones that were cached), unless ``--allow-stale-cache``."""
    if not args.cache:
        return None
    from ..inference.embeddings import open_feature_cache

    return open_feature_cache(model, args.cache, source_fingerprint=dataset.source.fingerprint(),
                              allow_stale=args.allow_stale_cache)


def _zeroshot(args, model) -> int:
    from ..eval.sets import open_labeled
    from ..eval.templates import load_templates
    from ..eval.zeroshot import evaluate_zeroshot, save_confusion_png

    templates = load_templates(args.templates)
    opts = {"image_column": args.image_column, "label_column": args.label_column, "image_root": args.image_root}
    dataset = open_labeled(args.dataset, args.classnames, **{k: v for k, v in opts.items() if v})
    res = evaluate_zeroshot(model, dataset, templates, cache=_cache(args, model, dataset), batch_size=args.batch_size,
                            progress=not args.quiet, reuse=args.reuse)
    _report_skipped(res.skipped, dataset.problems)
    print(f"zero-shot on {dataset.description}: {len(res.labels):,} images, {len(dataset.classnames)} classes, "
          f"templates {args.templates} ({len(templates)})")
    _print_metrics(res.metrics)
    table = res.per_class() if args.per_class else None
    if table:
        w = max(5, *(len(r["class"]) for r in table))
        print(f"\n{'class':<{w}}  {'n':>6}  {'recall':>7}  {'recall@5':>8}  {'precision':>9}  most confused with")
        for r in table:
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{r['class']:<{w}}  {r['n']:>6}  {fmt(r['recall']):>7}  {fmt(r['recall@5']):>8}  "
                  f"{fmt(r['precision']):>9}  {r['most_confused_with'] or '-'}")
    if args.confusion:
        path = save_confusion_png(res.confusion(), res.classnames, args.confusion,
                                  title=f"zero-shot: {Path(args.dataset).name}")
        print(f"confusion matrix drawn to {path}")
    if args.out:
        extra = {"n_images": len(res.labels), "n_classes": len(res.classnames), "classnames": res.classnames,
                 "templates": args.templates, "n_templates": len(templates), "cache": args.cache,
                 "skipped": [{"where": w, "reason": r} for w, r in list(dataset.problems) + list(res.skipped)]}
        if table:
            extra["per_class"] = table
        _dump(args.out, args.dataset, args.model, model, "zeroshot_classification", res.metrics, extra)
    return 0


def _retrieval(args, model) -> int:
    from ..eval.sets import open_retrieval
    from ..eval.retrieval import evaluate_retrieval

    ks = _ks(args.ks)
    opts = {"image_column": args.image_column, "caption_column": args.caption_column, "image_root": args.image_root}
    dataset = open_retrieval(args.dataset, **{k: v for k, v in opts.items() if v})
    res = evaluate_retrieval(model, dataset, cache=_cache(args, model, dataset), batch_size=args.batch_size, ks=ks,
                             progress=not args.quiet, reuse=args.reuse)
    _report_skipped(res.skipped, dataset.problems)
    print(f"retrieval on {dataset.description}: {res.n_images:,} images, {res.n_texts:,} captions")
    _print_metrics(res.metrics)
    if args.out:
        extra = {"n_images": res.n_images, "n_texts": res.n_texts, "cache": args.cache,
                 "skipped": [{"where": w, "reason": r} for w, r in list(dataset.problems) + list(res.skipped)]}
        _dump(args.out, args.dataset, args.model, model, "zeroshot_retrieval", res.metrics, extra)
    return 0


def _pointing(args, model) -> int:
    from ..errors import LittuneError
    from ..eval.pointing import play, save_pointing_figure
    from ..eval.sets import class_folder
    from ..eval.templates import load_templates

    if args.canvas < 32 or args.batch_size < 1 or args.show < 0:
        raise LittuneError("--canvas must be at least 32, --batch-size at least 1 and --show at least 0")
    load_templates(args.templates)  # a bad name is one line before any collage is drawn
    dataset = class_folder(args.dataset)
    res = play(model, dataset, collages=args.collages, seed=args.seed, canvas=args.canvas, templates=args.templates,
               batch_size=args.batch_size, show=args.show if args.figure else 0, progress=not args.quiet)
    m = res.metrics
    print(f"pointing game on {dataset.description}: {m['collages']} collages, {m['trials']} names, "
          f"{m['map_shape'][0]} x {m['map_shape'][1]} maps ({m['how']})")
    _print_metrics({k: m[k] for k in ("pointing_accuracy", "pointing_accuracy_among_names", "centre_baseline",
                                      "random_baseline", "reachable")})
    print(f"{m['seconds_per_map'] * 1000:.1f} ms per collage's heat maps (tower and head, batches of {args.batch_size})")
    if args.figure:
        print(f"figure drawn to {save_pointing_figure(res, args.figure, args.canvas)}")
    if args.out:
        extra = {"seed": args.seed, "canvas": args.canvas, "templates": args.templates, "trials": res.trials}
        _dump(args.out, args.dataset, args.model, model, "pointing_game", m, extra)
    return 0
