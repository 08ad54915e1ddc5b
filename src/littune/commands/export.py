"""Export a trained model so that it runs elsewhere, without torch or littune.

--format onnx writes, into the folder --out: text.onnx (token ids and attention mask to normalised
text embeddings), image.onnx (pixels to normalised image embeddings; left out, with the reason, if
the image tower does not export), tokenizer.json (for the `tokenizers` package, truncation and
padding built in) and littune_onnx.json (image preprocessing, temperature, logit bias, embedding
size, context length, pad id, fingerprints). Both graphs are checked against torch as they are
written. An --out that exists is refused unless --overwrite, which replaces an earlier export.
"""

from __future__ import annotations

import argparse

HELP = "export a model as ONNX graphs plus tokenizer, to run with onnxruntime alone"
EXAMPLE = "littune export runs/lu/model --format onnx --out runs/lu/onnx"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model directory")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="what to write (default onnx)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")


def run(args) -> int:
    from ..export import export_onnx_model
    from ..model import LiTModel

    model = LiTModel.from_pretrained(args.model)
    record = export_onnx_model(model, args.out, overwrite=args.overwrite)
    parts = "text.onnx" + (", image.onnx" if record["image"] else " (text side only)")
    print(f"exported {parts}, tokenizer.json, littune_onnx.json ({record['embed_dim']}-d) to {args.out}")
    return 0
