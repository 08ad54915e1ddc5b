"""Building the emoji dataset, as a recipe: fetch the packages, match icons to concepts, hold out
concepts, draw every (design, concept) pair, split the training pairs, write the tables, the
evaluation folders, ``skipped.tsv``, ``manifest.json`` and ``datacard.md``.

Every split is a seeded hash of an item's key (:mod:`littune.builders.splits`); every file goes
through :mod:`littune.fileio`; pictures already drawn from the same SVG are reused.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from ...errors import LittuneError
from ...fileio import atomic_write
from ..fetch import cache_dir, fetch_npm, find_npm_package, package_version
from ..output import check_formats, link_or_copy, prepare_out, prune_files, write_csv, write_report, write_wds
from ..render_pool import RenderJob, render_all
from ..splits import pick_fraction
from .card import datacard
from .concepts import (EMOJIBASE, EMOJIBASE_VERSION, Concept, caption_variants, emojibase_languages, load_concepts,
                       tagged_captions)
from .languages import write_language_eval
from .designs import DESIGNS, REFERENCE_DESIGNS, resolve_designs, resolve_heldout
from .iconify import IconSet
from .matching import NameIndex, match_icons

Skipped = list[tuple[str, str]]  # (where, message): one row of skipped.tsv each


@dataclass(frozen=True)
class EmojiOptions:
    """The checked settings of one build (see :func:`build_emoji`)."""

    heldout_concepts: float
    val_fraction: float
    limit_concepts: int | None
    langs: list[str]
    size: int
    seed: int
    formats: list[str]
    workers: int | None
    shard_size: int


@dataclass
class Drawing:
    """What :func:`draw` drew: ``{design: {concept id: relative PNG path}}``, and render_all's
    ``done`` (key -> renderer, ``"cached"`` when reused) and ``failed`` (key -> error)."""

    images: dict[str, dict[str, str]]
    done: dict[str, str]
    failed: dict[str, str]


@dataclass
class EmojiSplits:
    """Who is trained on and who is held out: design names, concept ids, (design, concept id) pairs."""

    train_designs: list[str]
    test_designs: list[str]
    concepts: list[str]
    train_concepts: list[str]
    heldout_concepts: set[str]
    train_pairs: list[tuple[str, str]]
    val_pairs: list[tuple[str, str]]


def check_options(heldout_concepts: float, val_fraction: float, limit_concepts: int | None,
                  langs: Sequence[str], size: int, seed: int, formats: Sequence[str], workers: int | None,
                  shard_size: int) -> EmojiOptions:
    """The settings, checked (a one-line error for each bad one); English is always a caption language."""
    if size < 8:
        raise LittuneError(f"--size {size}: too small")
    if not 0 <= heldout_concepts < 1 or not 0 <= val_fraction < 1:
        raise LittuneError("--heldout-concepts and --val-fraction must be in [0, 1)")
    if limit_concepts is not None and limit_concepts < 1:
        raise LittuneError(f"--limit-concepts {limit_concepts}: must be at least 1")
    formats = check_formats(formats)
    langs = [lang for lang in dict.fromkeys(langs) if lang and lang != "en"]
    return EmojiOptions(heldout_concepts, val_fraction, limit_concepts, langs, size, seed, formats, workers,
                        shard_size)


def fetch_packages(selected: Sequence[str], cache_root: Path, packages: str | Path | None, log) -> dict[str, Path]:
    """``{npm name: folder}`` of emojibase-data, the selected designs' icon sets and the code-point
    sets that name-only sets are matched against (from ``packages``, else fetched into the cache)."""
    want = {DESIGNS[d].package: DESIGNS[d].spec for d in selected}
    helpers = list(REFERENCE_DESIGNS) + [DESIGNS[d].chars_from for d in selected if DESIGNS[d].chars_from]
    refs = [r for r in dict.fromkeys(helpers) if DESIGNS[r].package not in want]
    specs = [f"{EMOJIBASE}@{EMOJIBASE_VERSION}", *want.values()]
    if packages is None:
        specs += [DESIGNS[r].spec for r in refs]
    pkgs = fetch_npm(specs, cache_root, packages=packages, log=log)
    if packages is not None:
        for r in refs:
            if (p := find_npm_package(packages, DESIGNS[r].package)) is not None:
                pkgs[DESIGNS[r].package] = p
    return pkgs


def open_icon_sets(selected: Sequence[str], pkgs: dict[str, Path]) -> dict[str, IconSet]:
    """The selected designs' icon sets; one without ``chars.json`` borrows its donor's (``chars_from``)."""
    sets = {d: IconSet(pkgs[DESIGNS[d].package]) for d in selected}
    for d in selected:
        donor = DESIGNS[d].chars_from
        if donor and not sets[d].chars and DESIGNS[donor].package in pkgs:
            donor_set = sets.get(donor) or IconSet(pkgs[DESIGNS[donor].package])
            sets[d].chars = {cp: n for cp, n in donor_set.chars.items() if sets[d].resolve(n) is not None}
    return sets


def match_designs(sets: dict[str, IconSet], concepts: Sequence[Concept], pkgs: dict[str, Path]
                  ) -> tuple[dict[str, dict[str, str]], Skipped]:
    """Each design's ``{concept key: icon name}``, and its unused icons with the reason."""
    ref_sets = [sets[d] if d in sets else IconSet(pkgs[DESIGNS[d].package])
                for d in REFERENCE_DESIGNS if d in sets or DESIGNS[d].package in pkgs]
    ref_sets += [s for d, s in sets.items() if s.chars and d not in REFERENCE_DESIGNS]
    index = NameIndex(concepts, ref_sets, pkgs[EMOJIBASE])
    skipped: Skipped = []
    icon_of: dict[str, dict[str, str]] = {}
    for d, iconset in sets.items():
        icon_of[d], unused = match_icons(iconset, concepts, index)
        skipped += [(f"icon {d}:{name}", why) for name, why in unused]
    return icon_of, skipped


def drawn_concepts(concepts: Sequence[Concept], icon_of: dict[str, dict[str, str]], limit: int | None,
                   seed: int, skipped: Skipped) -> list[Concept]:
    """The concepts some selected design draws (the others are skipped); ``limit`` of them by seeded hash."""
    have = {k for m in icon_of.values() for k in m}
    for c in concepts:
        if c.hexcode not in have:
            skipped.append((f"concept {c.id}", "no selected design draws it"))
    pool = [c for c in concepts if c.hexcode in have]
    if limit is not None and limit < len(pool):
        keep = pick_fraction([c.id for c in pool], limit / len(pool), seed, "limit:")
        pool = [c for c in pool if c.id in keep]
    return pool


def hold_out_concepts(pool: Sequence[Concept], fraction: float, seed: int) -> set[str]:
    """``fraction`` of the concept ids of each emoji group, by seeded hash: never trained on."""
    groups = defaultdict(list)
    for c in pool:
        groups[c.group].append(c.id)
    held: set[str] = set()
    for g in sorted(groups):
        held |= pick_fraction(groups[g], fraction, seed, f"heldout-concepts:{g}:")
    return held


def draw(out: Path, sets: dict[str, IconSet], pool: Sequence[Concept], icon_of: dict[str, dict[str, str]],
         opts: EmojiOptions, log, skipped: Skipped) -> Drawing:
    """Draw every (design, concept) into ``images/<design>/<concept id>.png``; remove stale images."""
    jobs = []
    for d, iconset in sets.items():
        for c in pool:
            name = icon_of[d].get(c.hexcode)
            if name is not None:
                jobs.append(RenderJob(key=f"{d}/{c.id}", out=str(out / "images" / d / f"{c.id}.png"),
                                      svg=iconset.svg(name)))
    log(f"emoji: {len(pool)} concepts x {len(sets)} designs = {len(jobs)} images "
        f"({sum(1 for j in jobs if Path(j.out).is_file())} on disk)")
    done, failed = render_all(jobs, opts.size, out / "images" / ".render.json", workers=opts.workers, desc="emoji")
    for key, err in sorted(failed.items()):
        skipped.append((f"image {key}", f"render failed: {err}"))
    removed = prune_files(out / "images", {Path(j.out) for j in jobs if j.key in done})
    if removed:
        log(f"emoji: removed {removed} stale image(s) from an earlier build")
    images = defaultdict(dict)
    for key in done:
        d, cid = key.split("/", 1)
        images[d][cid] = f"images/{d}/{cid}.png"
    return Drawing(images, done, failed)


def split_pairs(pool: Sequence[Concept], images: dict[str, dict[str, str]], selected: Sequence[str],
                held_families: Sequence[str], held: set[str], opts: EmojiOptions) -> EmojiSplits:
    """Training designs x training concepts, less ``val_fraction`` of those pairs (by seeded hash) for val."""
    train_designs = [d for d in selected if DESIGNS[d].family not in held_families]
    test_designs = [d for d in selected if DESIGNS[d].family in held_families]
    ids = sorted(c.id for c in pool)
    train_concepts = sorted(set(ids) - held)
    pairs = [(d, cid) for d in train_designs for cid in train_concepts if cid in images[d]]
    val_keys = pick_fraction([f"{d}/{cid}" for d, cid in pairs], opts.val_fraction, opts.seed, "val:")
    val_pairs = [p for p in pairs if f"{p[0]}/{p[1]}" in val_keys]
    train_pairs = [p for p in pairs if f"{p[0]}/{p[1]}" not in val_keys]
    return EmojiSplits(train_designs, test_designs, ids, train_concepts, held, train_pairs, val_pairs)


def write_tables(out: Path, splits: EmojiSplits, tagged: dict[str, list[tuple[str, str]]],
                 images: dict[str, dict[str, str]], opts: EmojiOptions, skipped: Skipped) -> tuple[int | None, int, list[str]]:
    """``train.csv`` (with ``csv``), ``val.csv`` and the WebDataset shards (with ``wds``), without any
    caption of a held-out concept; returns the train and val row counts and the train shard names.
    With caption languages (``opts.langs``) the CSVs have a third column, ``lang``."""
    captions = {cid: [text for text, _ in caps] for cid, caps in tagged.items()}
    held_caps = {cap.casefold() for cid in splits.heldout_concepts for cap in captions[cid]}
    dropped = Counter()
    header = ("image", "caption", "lang") if opts.langs else ("image", "caption")

    def rows(pairs):
        for d, cid in pairs:
            for cap, lang in tagged[cid]:
                if cap.casefold() in held_caps:
                    dropped[cap] += 1
                    continue
                yield (images[d][cid], cap, lang)[:len(header)]

    n_train = write_csv(out / "train.csv", rows(splits.train_pairs), header) if "csv" in opts.formats else None
    n_val = write_csv(out / "val.csv", rows(splits.val_pairs), header)
    if "csv" not in opts.formats and (out / "train.csv").exists():
        (out / "train.csv").unlink()
    for cap, n in sorted(dropped.items()):
        skipped.append((f"caption {cap!r}", f"equals a held-out concept's caption; dropped from {n} training image(s)"))
    if (out / "wds").is_dir():
        shutil.rmtree(out / "wds")
    if "wds" not in opts.formats:
        return n_train, n_val, []

    def samples(pairs):
        out_samples = []
        for d, cid in pairs:
            kept = [(c, lang) for c, lang in tagged[cid] if c.casefold() not in held_caps]
            meta = {"captions": [c for c, _ in kept], "concept": cid, "design": d}
            if opts.langs:  # each caption's language, parallel to the captions (as the CSVs' lang column)
                meta["langs"] = [lang for _, lang in kept]
            out_samples.append((f"{d}__{cid}", out / images[d][cid], meta))
        return out_samples

    shards = write_wds(out / "wds" / "train", "train", samples(splits.train_pairs), opts.shard_size)
    write_wds(out / "wds" / "val", "val", samples(splits.val_pairs), opts.shard_size)
    return n_train, n_val, shards


def write_eval(out: Path, pool: Sequence[Concept], images: dict[str, dict[str, str]], splits: EmojiSplits) -> dict:
    """``eval/<split>/<concept>/<design>.png`` + ``classnames.txt`` and ``eval/retrieval_<split>.csv``
    (English captions) for held-out designs, held-out concepts and both; returns their counts."""
    eval_dir = out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    name_of = {c.id: c.name for c in pool}
    en_caps = caption_variants(pool)
    held = sorted(splits.heldout_concepts)
    plan = {"heldout_designs": (splits.test_designs, sorted(set(splits.concepts))),
            "heldout_concepts": (splits.train_designs, held),
            "heldout_both": (splits.test_designs, held)}
    counts = {}
    for split, (designs, cids) in plan.items():
        members = [(d, cid) for cid in cids for d in designs if cid in images[d]]
        if not members:
            continue
        for d, cid in members:
            link_or_copy(out / images[d][cid], eval_dir / split / cid / f"{d}.png")
        classes = sorted({cid for _, cid in members})
        atomic_write(eval_dir / split / "classnames.txt", "".join(name_of[c] + "\n" for c in classes))
        write_csv(eval_dir / f"retrieval_{split}.csv",
                  ((f"{split}/{cid}/{d}.png", cap) for d, cid in sorted(members, key=lambda p: (p[1], p[0]))
                   for cap in en_caps[cid]))
        counts[split] = {"images": len(members), "classes": len(classes), "designs": designs}
    return counts


def design_entries(sets: dict[str, IconSet], pkgs: dict[str, Path], images: dict[str, dict[str, str]],
                   test_designs: Sequence[str]) -> dict[str, dict]:
    """The manifest's ``designs``: package, version, family, licence, split and image count of each."""
    return {d: {
        "package": DESIGNS[d].package, "version": package_version(pkgs[DESIGNS[d].package]),
        "family": DESIGNS[d].family, "title": DESIGNS[d].title, "license": iconset.license,
        "author": iconset.author, "split": "heldout" if d in test_designs else "train",
        "matched_by": "code points (chars.json)" if iconset.chars else "icon names",
        "images": len(images[d]),
    } for d, iconset in sets.items()}


def emoji_manifest(opts: EmojiOptions, held_families: Sequence[str], pkgs: dict[str, Path], designs: dict,
                   drawing: Drawing, splits: EmojiSplits, tables: tuple[int | None, int, list[str]],
                   eval_counts: dict, n_skipped: int, t0: float) -> dict:
    """The build's ``manifest.json``: settings, designs, counts, concept split, renderers, build time."""
    from ..render import renderer_versions

    n_train_rows, n_val_rows, shards = tables
    return {
        "builder": "emoji", "seed": opts.seed, "size": opts.size, "formats": opts.formats, "langs": opts.langs,
        "emojibase": {"version": package_version(pkgs[EMOJIBASE]), "license": "MIT"},
        "designs": designs, "train_designs": splits.train_designs, "heldout_designs": splits.test_designs,
        "heldout_families": list(held_families), "heldout_concept_fraction": opts.heldout_concepts,
        "val_fraction": opts.val_fraction, "limit_concepts": opts.limit_concepts,
        "counts": {
            "concepts": len(splits.concepts), "train_concepts": len(splits.train_concepts),
            "heldout_concepts": len(splits.heldout_concepts),
            "images": sum(len(v) for v in drawing.images.values()), "train_images": len(splits.train_pairs),
            "val_images": len(splits.val_pairs), "train_rows": n_train_rows, "val_rows": n_val_rows,
            "train_shards": len(shards), "render_failures": len(drawing.failed), "skipped": n_skipped,
            "eval": eval_counts,
        },
        "concepts": {"train": splits.train_concepts, "heldout": sorted(splits.heldout_concepts)},
        "renderers": renderer_versions(),
        "render_counts": dict(Counter(v for v in drawing.done.values())),
        "build_seconds": round(time.time() - t0, 1),
    }


def build_emoji(out: str | Path, *, designs: Iterable[str] | None = None,
                heldout_designs: Iterable[str] | None = None, heldout_concepts: float = 0.1,
                val_fraction: float = 0.05, limit_concepts: int | None = None, langs: Sequence[str] = (),
                size: int = 224, seed: int = 0, formats: Sequence[str] = ("csv",), workers: int | None = None,
                packages: str | Path | None = None, cache: str | Path | None = None,
                shard_size: int = 1000, log=None) -> dict:
    """Build the emoji dataset in ``out`` and return its manifest (also written to manifest.json).

    ``designs``: design or family names (default: all but ``fluent-3d``); ``heldout_designs``:
    families never trained on (default twemoji, openmoji; ``["none"]`` for none);
    ``heldout_concepts``: fraction of concepts never trained on; ``val_fraction``: share of the
    training images kept for ``val.csv``; ``limit_concepts``: build a quick subset; ``langs``:
    emojibase locales for extra captions (``["all"]``: every locale it has); ``formats``: ``csv`` and/or ``wds``; ``packages``: an
    existing ``node_modules`` folder instead of fetching. Idempotent: images already rendered at
    this size are reused.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t0 = time.time()
    opts = check_options(heldout_concepts, val_fraction, limit_concepts, langs, size, seed, formats, workers,
                         shard_size)
    selected = resolve_designs(designs)
    held_families = resolve_heldout(heldout_designs, selected)
    out = prepare_out(out, "emoji")
    pkgs = fetch_packages(selected, cache_dir(cache), packages, log)
    if opts.langs == ["all"]:  # every locale the emojibase package has
        opts = replace(opts, langs=[lang for lang in emojibase_languages(pkgs[EMOJIBASE]) if lang != "en"])
    concepts = load_concepts(pkgs[EMOJIBASE], opts.langs)
    if not concepts:
        raise LittuneError(f"{pkgs[EMOJIBASE]}: emojibase data holds no emoji concepts")
    sets = open_icon_sets(selected, pkgs)
    icon_of, skipped = match_designs(sets, concepts, pkgs)
    pool = drawn_concepts(concepts, icon_of, opts.limit_concepts, seed, skipped)
    held = hold_out_concepts(pool, opts.heldout_concepts, seed)
    drawing = draw(out, sets, pool, icon_of, opts, log, skipped)
    splits = split_pairs(pool, drawing.images, selected, held_families, held, opts)
    tables = write_tables(out, splits, tagged_captions(pool, opts.langs), drawing.images, opts, skipped)
    eval_counts = write_eval(out, pool, drawing.images, splits)
    if opts.langs:
        eval_counts = {s: {**c, "languages": write_language_eval(out, s, pool, ["en", *opts.langs])}
                       for s, c in eval_counts.items()}
    designs_entry = design_entries(sets, pkgs, drawing.images, splits.test_designs)
    manifest = emoji_manifest(opts, held_families, pkgs, designs_entry, drawing, splits, tables, eval_counts,
                              len(skipped), t0)
    write_report(out, manifest, skipped, datacard)
    log(f"emoji: wrote {out} in {manifest['build_seconds']} s: {len(splits.train_pairs)} train / "
        f"{len(splits.val_pairs)} val images, {len(skipped)} skipped (see skipped.tsv)")
    return manifest
