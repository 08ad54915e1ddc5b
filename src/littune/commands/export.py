"""Export a trained model so that it runs elsewhere, without torch or littune.

--format onnx writes, into the folder --out: text.onnx (token ids and attention mask to normalised
text embeddings), image.onnx (pixels to normalised image embeddings; left out, with the reason, if
the image tower does not export), tokenizer.json (for the `tokenizers` package, truncation and
padding built in) and littune_onnx.json (image preprocessing, temperature, logit bias, embedding
size, context length, pad id, fingerprints). An onnx: image tower's own graph is joined to the image
head. Both graphs are checked against littune's own embeddings as they are written. --exporter
chooses torch's ONNX exporter (torchscript, the default, or dynamo); littune_onnx.json records which wrote each.

--format web --index INDEX writes a search page that needs no server: the text side as above, the
index's image embeddings (embeddings.f16), a thumbnail of each image, index.html + app.js and the
onnxruntime-web and tokenizers.js files it loads (fetched once from npm into littune's cache, or
taken from --packages DIR, a folder from `npm install`). Serve the folder with any static file
server, e.g. `python -m http.server -d DIR`.

An --out that exists is refused unless --overwrite, which replaces an earlier export of that format.
"""

from __future__ import annotations

import argparse

from . import add_trust_code

HELP = "export a model as ONNX graphs plus tokenizer (onnxruntime alone), or as a static search page"
EXAMPLE = ("littune export runs/lu/model --format onnx --out runs/lu/onnx\n"
           "  littune export runs/lu/model --format web --index runs/lu/index --out runs/lu/web")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model directory")
    p.add_argument("--format", default="onnx", choices=["onnx", "web"], help="what to write (default onnx)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--index", metavar="INDEX", help="web: the index (from `littune index`) the page searches")
    p.add_argument("--packages", metavar="DIR", help="web: take onnxruntime-web and @huggingface/tokenizers "
                   "from this `npm install` folder instead of fetching them")
    p.add_argument("--thumb", type=int, default=128, metavar="PX", help="web: thumbnail size (default 128)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default=None,
                   help="torch's ONNX exporter (default: $LITTUNE_ONNX_EXPORTER, else torchscript with dynamo as "
                        "the fallback, one line saying why; a named exporter is never replaced)")
    add_trust_code(p)


def _run_web(args, model) -> int:
    from ..errors import LittuneError
    from ..export.web import export_web_demo
    from ..search import SearchIndex

    if not 16 <= args.thumb <= 1024:
        raise LittuneError(f"--thumb {args.thumb}: choose a size from 16 to 1024 px")
    record = export_web_demo(model, SearchIndex.open(args.index), args.out, overwrite=args.overwrite,
                             packages=args.packages, thumb=args.thumb, exporter=args.exporter)
    shown = sum(t is not None for t in record["thumbnails"])
    print(f"exported a search page over {record['count']} images ({shown} thumbnails) to {args.out}; "
          f"serve it with: python -m http.server -d {args.out}")
    return 0


def run(args) -> int:
    from ..errors import LittuneError
    from ..export.onnx import export_onnx_model
    from ..model.two_towers import LiTModel

    if args.format == "web" and not args.index:
        raise LittuneError("--format web needs --index INDEX (an index of this model's images, from `littune index`)")
    if args.format != "web" and (args.index or args.packages):
        raise LittuneError("--index and --packages go with --format web")
    model = LiTModel.from_pretrained(args.model, trust_code=args.trust_code)
    if args.format == "web":
        return _run_web(args, model)
    record = export_onnx_model(model, args.out, overwrite=args.overwrite, exporter=args.exporter)
    parts = "text.onnx" + (", image.onnx" if record["image"] else " (text side only)")
    print(f"exported {parts}, tokenizer.json, littune_onnx.json ({record['embed_dim']}-d) to {args.out}")
    return 0
