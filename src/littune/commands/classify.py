"""Classify images zero-shot against labels you choose, and print a ranked table per image.

The labels become prompts through a template set (--templates, short by default: a set littune ships
or a file with one template per line holding {}); each label's prompts are embedded,
averaged and compared with the image. Probabilities are a softmax over the labels (they sum to 1),
or with --multi-label an independent sigmoid per label. Images that cannot be read are reported and
the others are still classified (the exit status is then 1).

--heatmap OUT.png also draws, per image, where each label shown matches: the image tower runs once
more on the image (in torch, not onnxruntime), the image head is applied to the feature at each
location of its map and compared with the label's embedding (see littune.inference.heatmap); exact for
mean-pooled towers (EfficientNet-Lite, CNN maps), an approximation from the patch tokens for a
CLS-pooled ViT.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import add_trust_code

HELP = "zero-shot classify images against your own labels"
EXAMPLE = 'littune classify --model runs/lu/model photos/*.jpg --labels "cat,dog,horse" --top 3'


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.templates import sets_help

    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="a model directory")
    p.add_argument("--labels", "-l", help='comma-separated labels, e.g. "cat,dog,horse"')
    p.add_argument("--labels-file", metavar="FILE", help="labels, one per line (instead of or besides --labels)")
    p.add_argument("--templates", "-t", default="short",
                   help=f"prompt templates: {sets_help()}")
    p.add_argument("--top", type=int, default=5, help="labels shown per image (default 5; 0 = all)")
    p.add_argument("--multi-label", action="store_true", help="independent sigmoid per label instead of a softmax")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--heatmap", metavar="OUT.png",
                   help="also draw where each label shown matches: the image and a heat map per label (the image "
                        "tower run once more, in torch), to OUT.png, or OUT-1.png, OUT-2.png... for several images "
                        "(needs matplotlib: pip install 'littune[plot]')")
    add_trust_code(p)


def parse_labels(text: str | None, file: str | None = None) -> list[str]:
    """Labels from a comma-separated string and/or a file (one per line); errors on none or repeats."""
    from pathlib import Path

    from ..errors import LittuneError

    labels: list[str] = []
    if text is not None:
        labels += [x.strip() for x in text.split(",") if x.strip()]
    if file:
        path = Path(file)
        if not path.is_file():
            raise LittuneError(f"labels file not found: {file}")
        labels += [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()
                   if ln.strip() and not ln.strip().startswith("#")]
    if not labels:
        raise LittuneError('the label list is empty: give --labels "cat,dog,horse" or --labels-file FILE')
    from ..inference.mixin import repeated_label

    twice = repeated_label(labels)
    if twice is not None:
        raise LittuneError(f"label {twice!r} is given twice")
    return labels


def run(args) -> int:
    from ..data.base import printable
    from ..errors import LittuneError
    from ..eval.templates import load_templates
    from ..inference.embeddings import image_embeddings
    from ..model.two_towers import LiTModel

    labels = parse_labels(args.labels, args.labels_file)
    templates = load_templates(args.templates)
    if args.top < 0:
        raise LittuneError(f"--top must be 0 (all) or more, not {args.top}")
    if args.heatmap:
        from ..plots import pyplot

        pyplot("--heatmap")  # before the model loads: a missing extra is one line at once
    model = LiTModel.from_pretrained(args.model, trust_code=args.trust_code)
    weights = model.zeroshot_weights(labels, templates)
    emb, kept, skipped = image_embeddings(model, args.images, batch_size=args.batch_size, skip_bad=True)
    for where, why in skipped:
        print(f"littune classify: cannot read {printable(where)}: {why}", file=sys.stderr)
    probs = model.label_probabilities(emb, weights, multi_label=args.multi_label) if kept else None
    top = len(labels) if args.top == 0 else min(args.top, len(labels))
    results, drawn = [], []
    for row, i in enumerate(kept):
        p = probs[row]
        order = sorted(range(len(labels)), key=lambda c: (-float(p[c]), c))[:top]
        results.append({"image": printable(args.images[i]), "labels": [{"label": labels[c], "probability": float(p[c])}
                                                            for c in order]})
        if args.heatmap:
            results[-1]["heatmap"] = str(_draw_heatmap(model, args, i, order, labels, weights, p))
            drawn.append(results[-1]["heatmap"])
    if args.json:
        json.dump(results, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        width = max(len(x) for x in labels)
        for n, r in enumerate(results):
            if n:
                print()
            print(r["image"])
            for rank, item in enumerate(r["labels"], 1):
                bar = "#" * round(20 * item["probability"])
                print(f"  {rank:>2}. {item['label']:<{width}}  {item['probability']:.3f}  {bar}")
    sys.stdout.flush()
    for path in drawn:
        print(f"littune classify: heat maps drawn to {printable(path)}", file=sys.stderr)
    if not kept:
        raise LittuneError(f"none of the {len(args.images)} image(s) could be read")
    return 1 if skipped else 0


def heatmap_path(out: str, n: int, total: int):
    """Where image ``n`` (0-based) of ``total`` gets its heat maps: ``out`` itself for one image, else
    ``OUT-<n + 1>.png`` beside it (numbered in the order the images were given)."""
    from pathlib import Path

    out = Path(out)
    if total == 1:
        return out
    return out.with_name(f"{out.stem}-{n + 1:0{len(str(total))}d}{out.suffix or '.png'}")


def _draw_heatmap(model, args, i: int, order: list[int], labels: list[str], weights, probs):
    """Draw image ``i``'s heat maps for the labels ``order`` (the ones shown) to its :func:`heatmap_path`."""
    from ..inference.heatmap import heatmap
    from ..plots import save_heatmap_figure

    hm = heatmap(model, args.images[i], [labels[c] for c in order], weights=weights[order])
    path = save_heatmap_figure(hm, heatmap_path(args.heatmap, i, len(args.images)),
                               [f"{labels[c]}  p={float(probs[c]):.3f}" for c in order])
    return path
