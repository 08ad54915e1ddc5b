"""Run a locked image tower over a source once and write the embedding cache that training reads.

SOURCE is a CSV/TSV (image,caption), a JSONL file, webdataset tar shards (a .tar, a folder of them
or a brace pattern such as "shards-{000..009}.tar"), a folder of images with sidecar .txt captions,
or a COCO captions .json. Images are decoded in worker processes and embedded in batches; the cache
holds the tower's raw features (float16 by default), every caption and key, and a manifest with
the tower and source fingerprints and per-shard checksums. Images that cannot be decoded are
skipped and listed in CACHE/skipped.tsv; images without a caption are embedded (an index can use
them) but never trained on, and listed there too. --views K also stores K augmented views per image
(Inception crop + flip), so training from the cache still sees augmentation.

The run is resumable: if it is interrupted (even killed), run the same command again and it
continues from the last complete shard; the result is identical to an uninterrupted run
with the same options.

One embedding per image: an image file that an earlier cache embedded (the same resolved path, size,
mtime and inode; the same tower, pre-processing, runtime and pixel limit; for --views K the same seed)
is not embedded again: its row is copied from that cache (found through littune's feature index,
$LITTUNE_CACHE/features or ~/.cache/littune/features), so a second caption file over the same images,
`littune index` and `littune eval` embed only what is new. The cache written is complete on its own.
--no-reuse embeds everything.

--tokens [GRID] also stores each image's spatial map from the same forward pass (a CNN's last feature map,
EfficientNet-Lite0: 7 x 7 x 1280 at 224 px; a ViT's patch tokens), float16, for the centre-crop view only:
what heat maps and a pooling head over tokens read (EmbeddingCache.tokens). GRID bounds its size: a larger
map is average-pooled to GRID x GRID (--tokens 4: 16 tokens instead of 49). The grid is part of the cache's
plan: a cache made without tokens, or with another grid, is not resumed into (use another --out or
--no-resume). The bytes per image of the token shards are printed at the end.
Several processes: torchrun --nproc_per_node 2 -m littune embed SOURCE --out CACHE
(each rank embeds every N-th shard; rank 0 writes the manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HELP = "run a locked image tower over a source once and write the embedding cache"
EXAMPLE = "littune embed data/train.csv --tower efficientnet-lite0 --out cache/train --views 2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="CSV/TSV, JSONL, tar shards, image folder or COCO captions JSON")
    p.add_argument("--out", "-o", required=True, metavar="CACHE", help="the cache directory to write")
    p.add_argument("--tower", "-t", default="efficientnet-lite0",
                   help="image tower: efficientnet-lite0|1|2[@SIZE], hf:DIR or hf:HUB_ID[#cls|#mean|#pooler], "
                        "onnx:FILE[#output=NAME&pool=cls|mean|none], timm:NAME[#POOL] (littune[timm]), torch:pkg.mod:factory, "
                        "a JSON spec or a .json file holding one (default efficientnet-lite0)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored precision (default float16)")
    p.add_argument("--views", type=int, default=0, metavar="K",
                   help="also store K augmented views per image (default 0: the centre-crop view only)")
    p.add_argument("--tokens", nargs="?", const=True, default=None, type=_grid, metavar="GRID",
                   help="also store the tower's spatial map (CNN feature map, ViT patch tokens) of each image, "
                        "float16, from the same forward pass; GRID: average-pool a larger map to GRID x GRID "
                        "(default: the tower's own grid, 7 x 7 for efficientnet-lite0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default 16 on a CPU, 64 on a GPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding worker processes (default: one per two cores, at least 1, at most 6; "
                        "0 = decode in the main process)")
    p.add_argument("--lanes", type=int, default=None,
                   help="concurrent forward passes (default 2 on a CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per lane (default: the cores left after the workers, shared by the lanes)")
    p.add_argument("--shard-size", type=int, default=2048, help="images per shard, the unit of resuming (default 2048)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if CACHE holds an interrupted run")
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="embed every image, even those whose features another cache holds (by default an image "
                        "file that an earlier cache embedded with the same tower, pre-processing and runtime, "
                        "unchanged since, is copied from it, not embedded again)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmented views (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="what runs the tower: auto (default) takes onnxruntime on a CPU when the tower exports "
                        "to ONNX (once, kept in littune's cache folder), torch otherwise (channels_last; "
                        "float16 autocast on CUDA); recorded in the cache manifest, features agree within "
                        "float16 rounding")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs at a reduced DCT scale (draft) and shrink them with reducing_gap: faster, "
                        "pixels differ slightly, so the tower's fingerprint gets decode=fast (train with "
                        "model.image_tower {..., \"decode\": \"fast\"}); other formats as without it")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip images with more pixels than this (default 89,478,485, Pillow's limit)")
    g = p.add_argument_group("source options")
    g.add_argument("--type", dest="source_type", default=None,
                   help="force the source format: csv, jsonl, webdataset, folder, coco")
    g.add_argument("--image-column", help="CSV/JSONL: column or key holding the image path (default: found by name)")
    g.add_argument("--caption-column", help="CSV/JSONL/webdataset json: column or key holding the caption(s)")
    g.add_argument("--caption-sep", help="split a caption cell into several captions at this string, e.g. '|'")
    g.add_argument("--delimiter", help="CSV delimiter (default: ',' for .csv, tab for .tsv)")
    g.add_argument("--lang-column", help="column (CSV) or key (JSONL) of each caption's language "
                   "(default: lang, language or locale when present); training can sample by it")
    g.add_argument("--image-root", metavar="DIR",
                   help="base folder of relative image paths (default: the file's folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--trust-code", action="store_true",
                   help="let a --tower .json file name a torch factory that littune imports and calls (a spec "
                        "typed on the command line needs no such leave: it is your own)")


def _grid(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        hint = " (--tokens takes an optional GRID: put it after SOURCE, or give one: --tokens 4 SOURCE)"
        raise argparse.ArgumentTypeError(f"GRID must be a whole number >= 1, not {text!r}"
                                         + (hint if not text.lstrip("-").isdigit() else ""))
    return int(text)


def _tower_spec(text: str, trust_code: bool = False):
    """The tower spec ``--tower`` gives: a name, inline JSON, or a .json file (data: it may not name code
    to run unless ``trust_code``, see :mod:`littune.towers.trust`)."""
    from ..errors import LittuneError

    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise LittuneError(f"--tower: not valid JSON ({e.msg})") from None
    if text.endswith(".json") and os.path.isfile(text):
        from ..towers.cut import read_spec

        from ..towers.trust import refuse_code

        try:
            spec = read_spec(text)
        except LittuneError as e:
            raise LittuneError(f"--tower {e}") from None
        refuse_code(spec, text, trust_code)
        return spec
    return text


def run(args) -> int:
    import torch.distributed as dist

    from ..cache import embed_source, summary
    from ..data.decode import DEFAULT_MAX_PIXELS
    from ..data.sources import open_source
    from ..train.distributed import init_from_env
    from ..towers.image import build_image_tower, parse_image_tower

    options = {k: getattr(args, k) for k in ("image_column", "caption_column", "caption_sep", "delimiter",
                                             "image_root", "lang_column") if getattr(args, k)}
    spec = {"type": args.source_type, "path": args.source} if args.source_type else args.source
    source = open_source(spec, **options)
    rank, world, device = init_from_env(args.device)
    try:
        spec = _tower_spec(args.tower, args.trust_code)
        if args.fast_decode:
            spec = {**parse_image_tower(spec), "decode": "fast"}
        tower = build_image_tower(spec)
        cache = embed_source(
            source, tower, args.out, dtype=args.dtype, views=args.views, batch_size=args.batch_size,
            workers=args.workers, shard_size=args.shard_size, resume=args.resume, progress=not args.quiet,
            seed=args.seed, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, device=device,
            distributed=world > 1, lanes=args.lanes, threads=args.threads, runtime=args.runtime, reuse=args.reuse,
            tokens=args.tokens)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        note = source.bad_names_note(cache.directory / "skipped.tsv")
        if note:
            print(f"littune embed: {note}", file=sys.stderr)
        print(summary(cache))
        if cache.has_tokens:
            from ..cache.tokens import size_line

            print(size_line(cache))
        if cache.reuse.line():
            print(cache.reuse.line())
    if len(cache) == 0:
        from ..errors import LittuneError

        raise LittuneError(f"none of the {len(source):,} images of {source.describe()} could be decoded "
                           f"(see {cache.directory / 'skipped.tsv'})")
    return 0
