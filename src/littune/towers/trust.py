"""What a tower spec would run, and the refusal when a folder names code the user did not trust.

A model folder is data: its ``config.json`` may describe any tower, but building a ``torch`` tower
imports a module and calls a factory that the spec names (``subprocess:check_call`` runs a command).
Loading a folder (:meth:`littune.LiTModel.from_pretrained`, ``--model DIR``, the model an
``index.json`` records, an embedding cache's manifest) therefore refuses such a spec unless the user
opts in (``trust_code=True`` / ``--trust-code``), as transformers' ``trust_remote_code``. A spec the
user types (``--tower torch:...``, a train config) is the user's own code and runs.

littune's own factories (:data:`SAFE_FACTORIES`: numbers in, a network out) need no trust. A
Hugging Face folder's own Python (``auto_map`` in its ``config.json`` or ``tokenizer_config.json``)
is never run: every transformers loader gets ``trust_remote_code=False`` (:data:`NO_REMOTE_CODE`), and
:func:`remote_code_refusal` turns transformers' refusal into one line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LittuneError, UntrustedCodeError

#: littune's own tower factories: they take numbers and build a network, so a folder may name them.
SAFE_FACTORIES = frozenset({"littune.towers.tiny:tiny_cnn"})
#: What every transformers ``from_pretrained`` / ``from_config`` call gets: a folder's own Python never runs.
NO_REMOTE_CODE = {"trust_remote_code": False}


def code_named(spec) -> str | None:
    """The code building the image tower ``spec`` would import and call (``torch:pkg.mod:factory``), or None."""
    if isinstance(spec, dict) and spec.get("type") == "torch":
        factory = str(spec.get("factory"))
        return None if factory in SAFE_FACTORIES else f"torch:{factory}"
    return None


def refuse_code(spec, where: str | Path, trust_code: bool = False) -> None:
    """Raise :class:`UntrustedCodeError` (one line) if ``spec``, read from ``where``, names code to run
    and the user has not opted in with ``trust_code``."""
    code = code_named(spec)
    if code is None or trust_code:
        return
    factory = code.removeprefix("torch:")
    module, _, fn = factory.partition(":")
    raise UntrustedCodeError(
        f"{where} names code to run: the image tower {code} (littune would import {module} and call {fn}"
        f"{' with the arguments it gives' if spec.get('kwargs') else ''}); loading it runs that code, so "
        "littune refused: if you trust where it came from, pass trust_code=True (Python) or --trust-code "
        "(command line)")


def refuse_cache_code(spec, configured, manifest: Path) -> None:
    """An embedding cache's manifest names the tower spec a trained model is exported with: refuse one
    that names code to run which the configured tower (``configured``) does not name."""
    named = code_named(spec)
    if named is not None and named != code_named(configured):
        raise UntrustedCodeError(f"{manifest} names code to run ({named}) that model.image_tower does not name: "
                                 "littune will not build it; embed the cache again with the configured tower")


def remote_code_refusal(what: str, error: Exception) -> LittuneError | None:
    """One line for transformers' refusal to run a folder's own Python (None for any other error)."""
    text = str(error)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    return LittuneError(f"{what} asks to run Python files of its own (auto_map in its config.json or "
                        "tokenizer_config.json); littune never runs a model folder's code, with or without "
                        "trust_code")
