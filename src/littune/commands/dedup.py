"""Find training images that are near duplicates of evaluation images, to leave out of training.

Compares the locked image tower's features (the eval view of each embedding cache, L2-normalised,
not centred: plain cosine) of every training image with every evaluation image, in chunks of
training rows, and lists each training image whose best cosine is >= --threshold, with its score
and the evaluation image it matches. All caches must come from the same image tower. The list (a
TSV with a header) is what `littune train --set data.exclude=LIST` leaves out, matched by key.
"""

from __future__ import annotations

import argparse

HELP = "list training images that nearly duplicate evaluation images"
EXAMPLE = "littune dedup train.cache --against heldout.cache test.cache --threshold 0.95 --out dups.tsv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", metavar="TRAIN_CACHE", help="the training embedding cache")
    p.add_argument("--against", "-a", nargs="+", required=True, metavar="EVAL_CACHE",
                   help="evaluation embedding caches (same image tower)")
    p.add_argument("--threshold", "-t", type=float, required=True, metavar="T",
                   help="a training image is a near duplicate when its cosine to an evaluation image is >= T")
    p.add_argument("--out", "-o", required=True, metavar="LIST", help="the TSV list to write")
    p.add_argument("--chunk-rows", type=int, default=None, help="training rows per search (default 2048)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..cache import EmbeddingCache
    from ..data.dedup import DEFAULT_CHUNK_ROWS, near_duplicates, write_list

    train = EmbeddingCache.open(args.train)
    evals = [EmbeddingCache.open(d) for d in args.against]
    found = near_duplicates(train, evals, args.threshold, chunk_rows=args.chunk_rows or DEFAULT_CHUNK_ROWS,
                            progress=not args.quiet)
    write_list(args.out, found)
    n_eval = sum(len(e) for e in evals)
    print(f"found {len(found):,} of {len(train):,} training images with cosine >= {args.threshold:g} to one of "
          f"{n_eval:,} evaluation images; list written to {args.out}")
    return 0
