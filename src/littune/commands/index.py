"""Embed an image collection once with a trained model, for `littune search`.

The collection is a folder of images (searched recursively) or any source littune reads (CSV,
JSONL, COCO captions, tar shards). The image tower's features go through the embedding cache
(INDEX/features/ unless --cache names another), so an interrupted run resumes where it stopped and
a model with the same locked image tower re-uses them; a --cache of another source (other images,
even under the same names) or tower is refused unless --allow-stale-cache. The index holds the model's normalised image
embeddings (float16), the image paths and the model's embedding fingerprint; images that cannot be
decoded are skipped and listed in INDEX/skipped.tsv. Images that an earlier cache embedded with the same
locked tower (a `littune embed` of a caption file over the same files, say) are copied from it, not
embedded again (--no-reuse embeds everything). --faiss FACTORY also builds an approximate
FAISS index (needs faiss-cpu) for collections beyond a few million images.
"""

from __future__ import annotations

import argparse
import sys

from . import add_trust_code

HELP = "embed an image collection once for text and image search"
EXAMPLE = "littune index photos/ --model runs/lu/model --out photos.index"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="FOLDER_OR_SOURCE", help="a folder of images, or a CSV/JSONL/COCO/tar source")
    p.add_argument("--model", "-m", required=True, metavar="DIR", help="a model directory")
    p.add_argument("--out", "-o", required=True, metavar="INDEX", help="the index directory to write")
    p.add_argument("--cache", metavar="DIR", help="embedding cache for the tower features (default INDEX/features)")
    p.add_argument("--allow-stale-cache", action="store_true",
                   help="use --cache even if it was built from another source or tower (a warning says which)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=int, default=None, help="image decoding workers")
    p.add_argument("--faiss", metavar="FACTORY", help='also build a FAISS index, e.g. "Flat", "IVF1024,Flat", "HNSW32"')
    p.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="embed every image, even those whose tower features another cache holds (by default they "
                        "are copied from it, as `littune embed` does)")
    p.add_argument("--image-column", help="CSV: the image column (default: found by name)")
    p.add_argument("--image-root", metavar="DIR", help="CSV: base folder of relative image paths")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_trust_code(p)


def source_spec(path: str, image_column: str | None = None, image_root: str | None = None):
    """What to hand ``open_source``: a CSV without a caption column is read as a plain image list."""
    import csv
    import os

    from ..data.sources import CAPTION_COLUMNS

    opts = {k: v for k, v in {"image_column": image_column, "image_root": image_root}.items() if v}
    if path.lower().endswith((".csv", ".tsv", ".tab")) and os.path.isfile(path):
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f, delimiter="\t" if not path.lower().endswith(".csv") else ","), [])
        if not any(h.strip().lower() in CAPTION_COLUMNS for h in header):
            opts["caption_column"] = None  # captions are not needed to search images
    return {"path": path, **opts} if opts else path


def run(args) -> int:
    from ..data.sources import open_source
    from ..model.two_towers import LiTModel
    from ..search import SKIPPED_NAME, build_index

    model = LiTModel.from_pretrained(args.model, trust_code=args.trust_code)
    source = open_source(source_spec(args.source, args.image_column, args.image_root))
    index = build_index(model, source, args.out, model_dir=args.model, cache_dir=args.cache,
                        batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
                        faiss_factory=args.faiss, overwrite=args.overwrite,
                        allow_stale_cache=args.allow_stale_cache, reuse=args.reuse)
    skipped = index.meta.get("skipped", 0)
    tail = f"; skipped {skipped:,} (see {index.directory / SKIPPED_NAME})" if skipped else ""
    extra = f", FAISS {args.faiss}" if args.faiss else ""
    note = source.bad_names_note(index.directory / SKIPPED_NAME)
    if note:
        print(f"littune index: {note}", file=sys.stderr)
    print(f"indexed {len(index):,} images ({index.dim}-d float16{extra}) into {index.directory}{tail}")
    if index.reuse is not None and index.reuse.line():
        print(index.reuse.line())
    return 0
