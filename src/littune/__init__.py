"""littune: Locked-image Tuning (LiT) -- a locked image model, a text tower that learns to read it.

The public names are imported on first use (PEP 562), so that ``import littune`` -- and with it
``littune --help`` and every command's own start-up -- does not pay for torch until it needs it."""

from __future__ import annotations

import importlib
import os
import sys

# OpenMP threads that wait for work sleep instead of spinning (unless the user chose): on a machine whose
# cores are busy with other work, spinning threads starve the ones doing work. Measured on 2 loaded cores
# (load 12), one step of two linear heads at batch 1024 on 2 threads: 2,319 ms spinning, 183 ms passive
# (406 ms on 1 thread). It takes effect where littune is imported before torch (the command line, `python
# -m littune...`); a program that imports torch first can set OMP_WAIT_POLICY=PASSIVE itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "LiTConfig": "config",
    "LiTModel": "model.two_towers",
    "create_model_and_transforms": "export.openclip",
    "create_model_from_pretrained": "export.openclip",
    "get_tokenizer": "export.openclip",
    "parse_setting": "model.settings",
}


def _lazy_exports(package: str, table: dict[str, str]):
    """PEP 562 ``__getattr__`` and ``__dir__`` for ``package``: each name of ``table`` (name -> the package's
    module defining it) is imported on first use and kept."""
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            setattr(module, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)


def load(directory: str, map_location: str = "cpu", trust_code: bool = False) -> "LiTModel":  # noqa: F821
    """Shortcut for :meth:`LiTModel.from_pretrained` (``trust_code=True``: let the folder's config name a
    torch factory to import and call; only for a folder you trust)."""
    from .model.two_towers import LiTModel

    return LiTModel.from_pretrained(directory, map_location=map_location, trust_code=trust_code)


__all__ = ["LiTConfig", "LiTModel", "create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer",
           "load", "parse_setting", "__version__"]
