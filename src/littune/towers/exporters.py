"""The two ways torch writes a module as ONNX, and which one littune takes.

Every ONNX graph littune writes (a locked tower's for onnxruntime, :mod:`littune.towers.runtime`; ``littune
export``'s ``text.onnx`` and ``image.onnx``, :mod:`littune.export.onnx`) goes through :func:`onnx_bytes` with
one of :data:`EXPORTERS`:

* ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, then onnxscript's translation: needs
  the ``onnxscript`` package, ``pip install 'littune[onnx]'``); the dynamic axes become ``dynamic_shapes``,
  one :class:`torch.export.Dim` per axis name (inputs that share a name share the size);
* ``torchscript``: ``torch.onnx.export(..., dynamo=False)``, the tracing exporter torch deprecates.

Which one: the caller's choice (``littune export --exporter``), else ``$LITTUNE_ONNX_EXPORTER``, else
:data:`DEFAULT_EXPORTER` -- and only then, if that export fails or disagrees with torch, the other one, with one
line saying why (:func:`with_fallback`): TorchScript first, dynamo when TorchScript fails (a tower that leaves
torch inside its forward, which tracing freezes; a torch without the TorchScript exporter). A named exporter is used or fails, never replaced. Either way the
graph is checked against torch by the caller, and the exporter that wrote it is recorded beside it. The
exporter is not in any fingerprint: it changes how features are computed, not what they are.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Callable, TypeVar

import torch

from ..errors import LittuneError

EXPORTERS = ("dynamo", "torchscript")
#: measured: both export every graph kind littune writes and agree with torch alike, but dynamo takes 2-10x
#: longer on the real towers (EfficientNet-Lite0's tower 9.4 s against 1.6 s, e5-small's text 48 s against 24 s)
#: and more on tiny graphs (the tiny text graph 3.4 s against 0.13 s)
DEFAULT_EXPORTER = "torchscript"
ENV = "LITTUNE_ONNX_EXPORTER"
#: the opset each exporter writes unless told: TorchScript's littune has always used; dynamo's lowest (torch's
#: translations are written for 18; asked for less, it keeps 18 where it cannot convert, as for ReduceMean)
OPSETS = {"torchscript": 17, "dynamo": 18}
OPSET = OPSETS["torchscript"]

T = TypeVar("T")


def check_exporter(name: str) -> str:
    if name not in EXPORTERS:
        raise LittuneError(f"unknown ONNX exporter {name!r}; use one of {', '.join(EXPORTERS)}")
    return name


def chosen_exporter(exporter: str | None = None) -> tuple[str, bool]:
    """``(exporter, named)``: the one asked for, else ``$LITTUNE_ONNX_EXPORTER``, else the default (``named``
    False: the only case a failed export falls back to the other exporter)."""
    if exporter:
        return check_exporter(exporter), True
    env = os.environ.get(ENV, "").strip()
    if env:
        if env not in EXPORTERS:
            raise LittuneError(f"{ENV}={env!r} is not an ONNX exporter; use one of {', '.join(EXPORTERS)}")
        return env, True
    return DEFAULT_EXPORTER, False


def with_fallback(attempt: Callable[[str], T], what: str, exporter: str | None = None) -> tuple[T, str]:
    """``(attempt(name), name)`` with the chosen exporter; if it raises :class:`LittuneError` and was not
    named, ``attempt`` with the other exporter, and if that works one line says why (the exporter's error,
    first line only); if that fails too, its error is raised (the cause is then not the exporter)."""
    name, named = chosen_exporter(exporter)
    try:
        return attempt(name), name
    except LittuneError as e:
        if named:
            raise
        why = e
    other = next(x for x in EXPORTERS if x != name)
    done = attempt(other)
    print(f"littune: {what}: the {name} exporter failed, exported with {other} instead ({why})", file=sys.stderr)
    return done, other


@contextmanager
def _quiet():
    """The exporters' chatter (warnings, torch.onnx's log, onnxscript's prints) kept off the console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(inputs: list[str], axes: dict) -> tuple:
    """``dynamic_axes`` of the inputs as ``dynamic_shapes``: one ``Dim`` per axis name, shared by name."""
    from torch.export import Dim

    dims: dict[str, object] = {}
    return tuple({int(axis): dims.setdefault(name, Dim(name)) for axis, name in axes.get(i, {}).items()}
                 for i in inputs)


def graph_opset(data: bytes) -> int:
    """The default (``ai.onnx``) opset of an ONNX graph's bytes."""
    import onnx

    model = onnx.load_from_string(data)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def describe(e: Exception) -> str:
    """``Type: first line``; torch.onnx's step errors (``Failed to export ... step 1/3``) name their cause."""
    def line(x: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip()  # torch colours its step names
        return f"{type(x).__name__}: {text.splitlines()[0] if text else 'no message'}"

    cause = e.__cause__
    return f"{line(e)} -- {line(cause)}" if "Export" in type(e).__name__ and cause is not None else line(e)


def onnx_bytes(module: torch.nn.Module, example: tuple, inputs: list[str], output: str | list[str], axes: dict,
               opset: int | None = None, exporter: str = "torchscript") -> bytes:
    """``module`` on ``example`` as ONNX bytes with ``exporter`` (:data:`EXPORTERS`) at ``opset`` (None: the
    exporter's, :data:`OPSETS`; a graph at another opset than asked for is a :class:`LittuneError`);
    ``axes``: ``dynamic_axes`` (inputs' and outputs'); ``output``: a name, or a list."""
    outputs = [output] if isinstance(output, str) else list(output)
    opset = OPSETS[check_exporter(exporter)] if opset is None else opset
    with _quiet():
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(module, example, buf, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
            return buf.getvalue()
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise LittuneError("the dynamo ONNX exporter needs onnxscript (pip install 'littune[onnx]')") from None
        program = torch.onnx.export(module, example, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=_dynamic_shapes(inputs, axes), opset_version=opset,
                                    dynamo=True, external_data=False, verbose=False)
        data = program.model_proto.SerializeToString()
    if graph_opset(data) != opset:
        raise LittuneError(f"the dynamo exporter wrote opset {graph_opset(data)}, not {opset} "
                           f"(it writes {OPSETS['dynamo']} and up)")
    return data
