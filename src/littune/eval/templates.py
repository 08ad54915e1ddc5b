"""Prompt templates for zero-shot classification, kept as data.

A template is a sentence with one ``{}`` where the class name goes ("a photo of a {}."). A template
*set* is a plain text file with one template per line; blank lines and lines starting with ``#`` are
ignored. littune ships these sets in ``littune/data_files/templates/``:

* ``imagenet`` -- CLIP's 80 ImageNet templates (Radford et al. 2021);
* ``imagenet7`` -- the 7 of them CLIP's prompt-engineering notebook selected;
* ``short`` -- six domain-neutral templates (photo, picture, image, drawing, "a {}.", "{}");
* ``none`` -- ``{}`` alone: the class name is the prompt;
* ``emoji`` -- the forms emoji captions take ("{}", "{} emoji", "an emoji of {}", "a {} icon").

:func:`load_templates` takes one of those names or the path of your own file. The class name is
substituted with :func:`fill`, a plain string replacement, so other braces in a template are kept as
they are.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ..errors import LittuneError

PLACEHOLDER = "{}"


def builtin_sets() -> list[str]:
    """Names of the template sets shipped with littune, sorted."""
    folder = resources.files("littune").joinpath("data_files", "templates")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


#: a few words on each shipped set, for help texts (a shipped set missing here is still listed, by name)
ABOUT = {"short": "6 domain-neutral", "imagenet": "CLIP's 80", "imagenet7": "CLIP's 7", "none": "the bare name",
         "emoji": "emoji and icon forms"}


def sets_help(default: str | None = "short") -> str:
    """The template sets for a ``--templates`` help text, read from the shipped files (so every command lists
    the same sets): ``short (default; 6 domain-neutral), imagenet (CLIP's 80), ..., or a file ...``."""
    order = list(ABOUT)
    names = sorted(builtin_sets(), key=lambda n: (n != default, order.index(n) if n in order else len(order), n))
    parts = []
    for name in names:
        words = "; ".join(w for w in ("default" if name == default else "", ABOUT.get(name, "")) if w)
        parts.append(f"{name} ({words})" if words else name)
    return ", ".join(parts) + ", or a file with one template per line holding {}"


def parse_templates(text: str, where: str = "<templates>") -> list[str]:
    """Templates from file content: one per line, ``#`` comments and blank lines skipped.

    Raises :class:`LittuneError` naming ``where`` and the line when a template lacks ``{}`` or the
    text holds no template at all.
    """
    out: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        if PLACEHOLDER not in t:
            raise LittuneError(f"{where}:{n}: template {t!r} has no '{{}}' for the class name")
        out.append(t)
    if not out:
        raise LittuneError(f"{where} holds no templates (one per line, each with '{{}}' for the class name)")
    return out


def load_templates(name_or_path: str) -> list[str]:
    """The templates of a built-in set (:func:`builtin_sets`: ``short``, ``imagenet``, ``imagenet7``, ``none``,
    ``emoji``) or of a file.

    A name that is neither a built-in set nor an existing file raises :class:`LittuneError` listing
    the sets.
    """
    name = str(name_or_path).strip()
    if not name:
        raise LittuneError("empty template set name; use one of " + ", ".join(builtin_sets()) + " or a file")
    folder = resources.files("littune").joinpath("data_files", "templates")
    builtin = folder.joinpath(f"{name}.txt")
    if os.sep not in name and "/" not in name and builtin.is_file():
        return parse_templates(builtin.read_text(encoding="utf-8"), f"templates:{name}")
    path = Path(os.path.expanduser(name))
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise LittuneError(f"template file {path} is not UTF-8 text ({e.reason})") from None
        return parse_templates(text, str(path))
    if path.is_dir():
        raise LittuneError(f"template file {path} is a directory")
    raise LittuneError(f"unknown template set {name!r}: use one of {', '.join(builtin_sets())} "
                       "or the path of a file with one template per line")


def fill(template: str, classname: str) -> str:
    """``template`` with its ``{}`` replaced by ``classname``."""
    return template.replace(PLACEHOLDER, classname)
