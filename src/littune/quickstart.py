"""The main job behind `make quickstart`: LiT on real drawings, every language, honest held-out numbers.

1. **Data** (:mod:`littune.quickstart_data`) -- ``littune data emoji --langs all``: about 1,900 emoji
   concepts in ten design families, captioned in English and the 27 other emojibase locales, two
   families (Twemoji, OpenMoji) and 10% of the concepts never trained on; ``littune data
   openclipart``: public-domain drawings with titles, keywords and descriptions, split by title. Both
   go into one training source.
2. **Embed once** -- ``littune embed``: the locked ImageNet EfficientNet-Lite0 runs over every image
   one time; training reads those features from the cache instead of running the tower on the images.
   ``littune dedup`` lists training images that nearly duplicate an evaluation image; training skips them.
3. **Train** ``Lu`` -- ``littune train``: one text transformer from scratch for every language, from
   the cache; each step reads one caption per image, English with probability :data:`LANGUAGE_SHARE`.
4. **Evaluate** -- zero-shot classification (prompt ensemble) of the held-out designs, the held-out
   concepts and both at once, and text<->image retrieval on their captions, next to two baselines:
   chance, and an image-only prototype classifier (the mean locked image features of each concept's
   training designs, nearest prototype), the ceiling a locked tower allows for concepts seen in
   training; retrieval on the Openclipart test drawings; and the same held-out images asked about in
   each language (:mod:`littune.eval.languages`).

Prints the tables and writes them (``results.md``, ``results.json``, ``languages.png``) with the run
directory (model, plots, metrics) under ``out/quickstart`` (``out/quickstart-quick`` with ``QUICK=1``:
200 emoji concepts, 600 drawings and fewer steps, a few minutes). Everything is reused on a second run.
Evaluation and baselines are :mod:`littune.benchmark`, which the study shares; this module adds the
``Lu`` run and its tables (:func:`run_quickstart`).

    python -m littune.quickstart [--quick] [--out DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import benchmark as bench

IMAGE_TOWER = "efficientnet-lite0"
#: the text tower from scratch: the study's, with a vocabulary for 28 languages' scripts
TEXT_TOWER = {**bench.TEXT_TOWER, "vocab_size": 16000, "context_length": 32}
#: English's share of each image's caption draws; the rest is split among its other languages. At the
#: main job's 400 steps, 0.9 keeps English within 0.02 top-1 of English alone (0.5 costs it 0.09; see
#: the README's table of shares)
LANGUAGE_SHARE = {"en": 0.9}


# -- training and the table -----------------------------------------------------------------------
def train_overrides(paths: dict, run_dir: Path, steps: int, batch: int = 256, text_tower: dict | None = None,
                    embed_dim: int = 256, image_tower: str | dict = IMAGE_TOWER,
                    validations: int = 4, language_share: dict | None = None) -> list[str]:
    """The ``littune train --set`` overrides of the quickstart's ``Lu`` run (validated ``validations``
    times, the last at the end). ``paths`` from :func:`littune.quickstart_data.prepare_mix` add the
    mixed source, the dedup list and the Openclipart test set; :func:`littune.benchmark.prepare`'s
    (the study's) train on the English emoji alone."""
    zs = [{"name": f"{s}", "cache": str(v["cache"]), "classnames": str(v["classnames"]),
           "templates": bench.TEMPLATES}
          for s, v in paths["eval"].items()]
    rt = [{"name": f"{s}_retrieval", "cache": str(v["cache"]), "group_by_folder": True}
          for s, v in paths["eval"].items()]
    if "clipart" in paths:
        rt.append({"name": "openclipart_test_retrieval", "cache": str(paths["clipart"]["cache"])})
    extra = [f"data.exclude={paths['exclude']}"] if paths.get("exclude") else []
    if language_share:
        extra.append(f"data.language_share={json.dumps(language_share)}")
    return extra + [
        "model.setting=Lu", f"model.image_tower={json.dumps(image_tower)}",
        f"data.source={paths.get('source', paths['data'] / 'train.csv')}", f"data.cache={paths['train']}",
        f"run_dir={run_dir}", f"steps={steps}", f"data.batch_size={batch}", "optim.lr=1e-3",
        "optim.weight_decay=1e-4", f"schedule.warmup_steps={max(1, steps // 10)}", "log_every=10",
        f"checkpoint_every={max(50, steps // 4)}", f"val.every={max(1, -(-steps // max(1, validations)))}",
        f"model.text_tower={json.dumps(text_tower or bench.TEXT_TOWER)}", f"model.embed_dim={embed_dim}",
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
        proto = bench.prototype_baseline(paths["train"], info["cache"])
        n_images = paths["manifest"]["counts"]["eval"][split]["images"]
        rows.append({"split": split, "tests": bench.SPLITS[split], "images": n_images, "classes": n_classes,
                     "chance_acc1": 1 / n_classes, "prototype": proto, "model": label,
                     "acc1": m["acc1"], "acc5": m["acc5"], "mean_per_class_recall": m["mean_per_class_recall"],
                     "image_retrieval_recall@1": r.get("image_retrieval_recall@1"),
                     "image_retrieval_recall@5": r.get("image_retrieval_recall@5"),
                     "text_retrieval_recall@1": r.get("text_retrieval_recall@1"),
                     "text_retrieval_recall@5": r.get("text_retrieval_recall@5")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| held-out split | images | classes | chance top-1 | image-only prototype top-1 (seen concepts) | "
            "zero-shot top-1 | top-5 | text→image R@1 | R@5 | image→text R@1 | R@5 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        p = r["prototype"]
        proto = f"{p['acc1']:.3f} ({p['classes']} classes)" if p else "n/a (no concept seen)"
        lines.append(f"| {r['split']}: {r['tests']} | {r['images']} | {r['classes']} | {r['chance_acc1']:.4f} | "
                     f"{proto} | {bench.fmt(r['acc1'])} | {bench.fmt(r['acc5'])} | {bench.fmt(r['image_retrieval_recall@1'])} | "
                     f"{bench.fmt(r['image_retrieval_recall@5'])} | {bench.fmt(r['text_retrieval_recall@1'])} | "
                     f"{bench.fmt(r['text_retrieval_recall@5'])} |")
    return "\n".join(lines)


def _header(paths: dict, steps: int, batch: int, image_tower, text_tower: dict, commit: str, seconds: dict,
            excluded: int | None) -> str:
    c = paths["manifest"]["counts"]
    image = "ImageNet EfficientNet-Lite0" if image_tower == IMAGE_TOWER else f"{image_tower}"
    clip = ""
    if "clipart" in paths:
        clip = (f" and {paths['clipart']['train_images']} Openclipart drawings (titles, keywords, descriptions); "
                f"captions in {len(paths['languages'])} languages, English drawn with share "
                f"{paths['language_share'].get('en', 0):g}; {excluded} near-duplicates of evaluation images excluded")
    return (f"LiT `Lu` on emoji: locked {image}, text transformer from scratch "
            f"({text_tower['depth']}x{text_tower['width']}, {text_tower['vocab_size']}-token BPE), {steps} steps of "
            f"{batch} pairs; trained on {c['train_images']} emoji images of {c['train_concepts']} concepts in "
            f"{len(paths['manifest']['train_designs'])} designs{clip}. Zero-shot: prompt ensemble 'emoji'; retrieval: "
            f"any design of the caption's concept counts. littune commit {commit}, "
            f"{seconds['all']:.0f} s in all (data + embedding {seconds['data']:.0f} s, training + evaluation "
            f"{seconds['train']:.0f} s) on {os.cpu_count()} cores.")


def _evaluate_languages(paths: dict, run_dir: Path, out: Path) -> tuple[list[dict], str]:
    """The per-language rows and table of the trained model; its plot goes to ``out/languages.png``."""
    from .eval.languages import language_plot, language_scores, language_table
    from .model import LiTModel

    model = LiTModel.from_pretrained(run_dir / "model")
    caches = {s: v["cache"] for s, v in paths["eval"].items()}
    fallback = {s: {lang: v["english_names"] for lang, v in c.get("languages", {}).items()}
                for s, c in paths["manifest"]["counts"]["eval"].items()}
    rows = language_scores(model, paths["data"], caches, paths["languages"], fallback)
    language_plot(rows, out / "languages.png")
    return rows, language_table(rows)


def run_quickstart(out: str | Path, quick: bool = False, steps: int | None = None, batch: int | None = None,
                   image_tower: str | dict = IMAGE_TOWER, text_tower: dict | None = None, embed_dim: int = 256,
                   progress: bool = True, language_share: dict | None = None, clipart: dict | None = None,
                   **build_options) -> dict:
    """Data, caches, the ``Lu`` run (reused when finished) and the tables; writes ``out/results.md``
    and ``out/results.json`` and returns what the latter holds. ``steps`` default 400 (quick 100),
    ``batch`` 256 (quick 128), ``language_share`` :data:`LANGUAGE_SHARE`; the towers, ``clipart``
    and ``build_options`` (see :func:`littune.quickstart_data.prepare_mix`) let a test run it small."""
    from .config import load_config
    from .quickstart_data import prepare_mix
    from .trainer import Trainer

    t0 = time.time()
    out = Path(out)
    steps = steps or (100 if quick else 400)
    batch = batch or (128 if quick else 256)
    text_tower = text_tower or TEXT_TOWER
    share = LANGUAGE_SHARE if language_share is None else language_share
    paths = prepare_mix(out, quick, tower=image_tower, progress=progress, clipart=clipart, **build_options)
    paths["language_share"] = share
    t_data = time.time() - t0
    run_dir = out / "run"
    bench.say(f"train: littune train --set model.setting=Lu --set data.cache={paths['train']} --set steps={steps} "
              f"--set run_dir={run_dir} ... (resolved configuration: {run_dir / 'config.yaml'})")
    cfg = load_config(overrides=train_overrides(paths, run_dir, steps, batch=batch, text_tower=text_tower,
                                                embed_dim=embed_dim, image_tower=image_tower,
                                                validations=2, language_share=share))
    cfg.progress = progress
    if (run_dir / "results.json").is_file() and (run_dir / "model").is_dir():
        bench.say(f"train: {run_dir} is finished; reusing it (delete it to train again)")
    else:
        Trainer(cfg).run()
    t_train = time.time() - t0 - t_data
    return _report(out, paths, steps, batch, image_tower, text_tower, t0, {"data": t_data, "train": t_train})


def _report(out: Path, paths: dict, steps: int, batch: int, image_tower, text_tower: dict, t0: float,
            seconds: dict) -> dict:
    """The tables of the finished run: ``results.md``, ``results.json`` (returned) and ``languages.png``."""
    from .eval.languages import language_summary

    run_dir = out / "run"
    metrics = json.loads((run_dir / "results.json").read_text())
    rows = results_rows(paths, metrics)
    lang_rows, lang_table = _evaluate_languages(paths, run_dir, out)
    commit = bench.code_commit()
    seconds = {**seconds, "all": time.time() - t0}
    header = _header(paths, steps, batch, image_tower, text_tower, commit, seconds, paths["duplicates"])
    clip = metrics.get("openclipart_test_retrieval", {})
    clip_line = (f"Openclipart test drawings (never trained on; {paths['clipart']['retrieval_images']} with a caption no "
                 f"other test drawing has): text→image R@1 "
                 f"{bench.fmt(clip.get('image_retrieval_recall@1'))}, R@5 {bench.fmt(clip.get('image_retrieval_recall@5'))}, "
                 f"image→text R@1 {bench.fmt(clip.get('text_retrieval_recall@1'))}.")
    text = "\n\n".join([header, markdown_table(rows), clip_line,
                         "Per language (class names and captions in that language, bare-name prompt):", lang_table]) + "\n"
    (out / "results.md").write_text(text, encoding="utf-8")
    result = {"header": header, "rows": rows, "openclipart_test": clip, "languages": lang_rows,
              "language_summary": language_summary(lang_rows), "duplicates_excluded": paths["duplicates"],
              "language_share": paths["language_share"], "steps": steps, "batch": batch, "commit": commit,
              "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print("\n" + text)
    print(f"model: {run_dir / 'model'}   plots: {run_dir / 'plots'}   languages: {out / 'languages.png'}   "
          f"table: {out / 'results.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m littune.quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"),
                    help=f"{bench.QUICK_CONCEPTS} concepts and fewer steps: a few minutes (also QUICK=1)")
    ap.add_argument("--out", default=None, help="output folder (default out/quickstart or out/quickstart-quick)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 400, quick 100)")
    args = ap.parse_args(argv)
    run_quickstart(args.out or ("out/quickstart-quick" if args.quick else "out/quickstart"), args.quick, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
