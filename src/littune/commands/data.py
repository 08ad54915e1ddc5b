"""Build a ready image-text dataset from offline packages.

`littune data emoji` draws about 1,900 emoji concepts in up to 11 designs (npm Iconify sets and
emojibase-data, fetched once with npm into the cache) and writes train/val CSVs plus evaluation
folders that hold out whole design families (default: Twemoji and OpenMoji) and 10% of the
concepts. `littune data openclipart` renders Debian's Openclipart drawings (apt-get download, no
root) with captions from titles, keywords and descriptions, split train/val/test. Both are
idempotent (a second run reuses the download and the rendered images), show progress on stderr,
and write datacard.md, skipped.tsv and manifest.json. The cache is $LITTUNE_CACHE or
~/.cache/littune.
"""

from __future__ import annotations

import argparse

HELP = "build a ready image-text dataset (emoji, openclipart) from offline packages"
EXAMPLE = "littune data emoji --out data/emoji --langs de,fr,ja"


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _designs_help() -> str:
    from littune.builders.emoji.designs import DESIGNS

    return "; ".join(f"{d.name} ({d.family}{'' if d.default else ', not default'})" for d in DESIGNS.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    e = sub.add_parser("emoji", help="emoji concepts drawn in many design families",
                       description="Emoji concepts in many designs with held-out design families and concepts. "
                       "Designs (family): " + _designs_help() + ".",
                       epilog="example:\n  littune data emoji --out data/emoji --langs de,fr,ja\n"
                       "  littune data emoji --out data/emoji-small --limit-concepts 200 --designs noto,twemoji,openmoji",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--out", required=True, help="output folder (created; reused on a second run)")
    e.add_argument("--designs", type=_csv_list, default=None,
                   help="comma-separated design or family names, or 'all' (default: all but fluent-3d)")
    e.add_argument("--heldout-designs", type=_csv_list, default=None,
                   help="design families never trained on (default: twemoji,openmoji; 'none' for none)")
    e.add_argument("--heldout-concepts", type=float, default=0.1,
                   help="share of concepts never trained on, per emoji group (default 0.1)")
    e.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of training images kept for val.csv (default 0.05)")
    e.add_argument("--limit-concepts", type=int, default=None, help="keep only N concepts (a quick build)")
    e.add_argument("--langs", type=_csv_list, default=[], help="extra caption languages from emojibase, e.g. de,fr,ja, or all (every locale it has)")
    _common(e)
    e.add_argument("--packages", default=None,
                   help="use an existing node_modules folder (from `npm install`) instead of fetching")
    e.set_defaults(_build="emoji")

    o = sub.add_parser("openclipart", help="Openclipart 0.18 drawings with titles and keywords",
                       description="Openclipart drawings from Debian's openclipart-svg, filtered, "
                       "captioned from titles, keywords and descriptions, split train/val/test.",
                       epilog="example:\n  littune data openclipart --out data/openclipart",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    o.add_argument("--out", required=True, help="output folder (created; reused on a second run)")
    o.add_argument("--source", default=None,
                   help="an openclipart SVG folder or openclipart-svg_*.deb (default: apt-get download)")
    o.add_argument("--split", type=lambda s: [float(x) for x in _csv_list(s)], default=[0.8, 0.1, 0.1],
                   help="train,val,test shares (default 0.8,0.1,0.1)")
    o.add_argument("--limit", type=int, default=None, help="keep only N usable drawings (a quick build)")
    _common(o)
    o.set_defaults(_build="openclipart")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="seed of every split (default 0)")
    p.add_argument("--format", type=_csv_list, default=["csv"],
                   help="csv, wds (WebDataset tar shards) or csv,wds (default csv)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU cores)")
    p.add_argument("--cache", default=None, help="download cache (default $LITTUNE_CACHE or ~/.cache/littune)")


def run(args) -> int:
    if args._build == "emoji":
        from littune.builders.emoji import build_emoji

        m = build_emoji(args.out, designs=args.designs, heldout_designs=args.heldout_designs,
                        heldout_concepts=args.heldout_concepts, val_fraction=args.val_fraction,
                        limit_concepts=args.limit_concepts, langs=args.langs, size=args.size, seed=args.seed,
                        formats=args.format, workers=args.workers, packages=args.packages, cache=args.cache)
        c = m["counts"]
        print(f"{args.out}: {c['images']} images of {c['concepts']} concepts; train {c['train_images']} images "
              f"({c['train_concepts']} concepts, designs {', '.join(m['train_designs'])}), val {c['val_images']}, "
              f"held-out concepts {c['heldout_concepts']}, held-out designs {', '.join(m['heldout_designs']) or 'none'}")
    else:
        from littune.builders.openclipart import build_openclipart

        m = build_openclipart(args.out, source=args.source, size=args.size, seed=args.seed, fractions=args.split,
                              limit=args.limit, workers=args.workers, formats=args.format, cache=args.cache)
        c = m["counts"]
        print(f"{args.out}: {c['images']} drawings; train {c['train_images']}, val {c['val_images']}, "
              f"test {c['test_images']} ({c['retrieval_test_rows']} retrieval captions); skipped {c['skipped']}")
    return 0
