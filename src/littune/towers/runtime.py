"""Runtimes for locked image towers: the same features, computed as fast as this machine allows.

A locked tower's outputs never change, so *how* they are computed is free to choose. littune runs a
locked tower over images (``littune embed``, ``littune index``, evaluation from images) through a
:class:`Runner`, ``runner(pixels) -> (B, D) float32 numpy``:

* ``onnxruntime`` (CPU): the tower is exported with ``torch.onnx.export`` once per tower
  fingerprint into littune's cache folder (``$LITTUNE_CACHE/towers`` or ``~/.cache/littune/towers``),
  written atomically and checked on every load (size, sha256, the fingerprint it belongs to); a file
  that is missing, corrupt or from another tower is exported again. Right after an export the graph's
  outputs are compared with torch's on two inputs; an export that disagrees is not used. An
  ``onnx:`` tower already is an ONNX graph and runs as it is.
* ``torch``: eval mode under ``inference_mode``; convolutional towers in ``channels_last`` memory
  format; on CUDA under float16 autocast.

``auto`` (the default) takes onnxruntime on a CPU when the tower exports, torch otherwise (CUDA, or a
tower that cannot be exported: one line says why). The runtime never changes the tower's fingerprint:
features from both agree far inside the float16 rounding the cache stores (tested: cosine > 0.99999).
"""

from __future__ import annotations

import io
import json
import sys
import warnings
from contextlib import contextmanager, nullcontext, redirect_stderr
from pathlib import Path

import numpy as np
import torch

from ..errors import LittuneError
from ..fileio import atomic_write, cache_home, write_json
from ..hashing import hash_file, hash_text

RUNTIMES = ("auto", "torch", "onnxruntime")
OPSET = 17
#: largest |difference| between an export's outputs and torch's, relative to the outputs' scale
EXPORT_TOLERANCE = 1e-3


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise LittuneError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return runtime


def _say(text: str) -> None:
    print(f"littune: {text}", file=sys.stderr)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are: its first parameter's device, else its first buffer's, else the CPU."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _device(tower: torch.nn.Module, device=None) -> torch.device:
    return torch.device(device) if device is not None else module_device(tower)


# ---------------------------------------------------------------------------------------------
class TorchRunner:
    """The tower itself: eval mode, ``inference_mode``, channels_last for convolutions, CUDA autocast."""

    name = "torch"

    def __init__(self, tower: torch.nn.Module, device=None, autocast: bool = True):
        self.tower, self.device = tower, _device(tower, device)
        self.tower.eval().to(self.device)
        self.channels_last = any(p.ndim == 4 for p in tower.parameters())
        if self.channels_last:
            self.tower.to(memory_format=torch.channels_last)
        self.autocast = autocast and self.device.type == "cuda"

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        x = pixels.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.autocast else nullcontext()
        with torch.inference_mode(), amp:
            y = self.tower(x)
        return y.float().cpu().numpy()

    def close(self) -> None:
        """Give the tower back in the default memory format."""
        if self.channels_last:
            self.tower.to(memory_format=torch.contiguous_format)


class ONNXRunner:
    """An ONNX graph of the tower on onnxruntime's CPU provider, ``threads`` intra-op threads.

    One session serves concurrent calls (onnxruntime releases the GIL), so several forward lanes of
    one thread each run in parallel, as torch's lanes do."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        y = self.session.run(None, {self.input: x})[0]
        return np.asarray(y, dtype=np.float32)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
def export_dir(tower) -> Path:
    """Where the ONNX export of ``tower`` is kept: one folder per tower fingerprint."""
    return cache_home() / "towers" / hash_text(tower.fingerprint())[:24]


def _record_ok(folder: Path, fingerprint: str) -> bool:
    """Is ``folder`` a complete export of the tower ``fingerprint`` (record, size, checksum)?"""
    try:
        rec = json.loads((folder / "tower.json").read_text())
        onnx_file = folder / "tower.onnx"
        return (rec.get("fingerprint") == fingerprint and onnx_file.stat().st_size == rec.get("bytes")
                and hash_file(onnx_file) == rec.get("sha256"))
    except (OSError, ValueError):
        return False


@contextmanager
def _locked(folder: Path):
    """One exporter at a time per folder (ranks of a torchrun, two embeds): the OS drops it on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield


def onnx_bytes(module: torch.nn.Module, example: tuple, inputs: list[str], output: str, axes: dict,
               opset: int = OPSET) -> bytes:
    """``module`` traced on ``example`` as ONNX bytes (``torch.onnx.export``, TorchScript exporter, opset
    :data:`OPSET` unless told), the exporter's chatter kept off the console."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, input_names=inputs, output_names=[output],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return buf.getvalue()


def first_line(e: Exception) -> str:
    """``Type: first line of the message``: the exporter's errors are many and long."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no message'}"


def _export_bytes(tower: torch.nn.Module, size: int) -> bytes:
    """The tower as ONNX bytes, batch axis dynamic."""
    return onnx_bytes(tower, (torch.zeros(2, 3, size, size),), ["pixels"], "features",
                      {"pixels": {0: "batch"}, "features": {0: "batch"}})


def _agreement(tower: torch.nn.Module, path: Path, size: int) -> float:
    """Largest |ONNX - torch| on two seeded inputs, relative to the largest |torch| output."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = tower(x).float().numpy()
    got = ONNXRunner(path, threads=1)(x)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def export_onnx(tower, folder: Path | None = None) -> Path:
    """The tower's ONNX file, exported now unless a complete, matching export is kept already.

    Raises :class:`LittuneError` (one line, the reason) if the tower cannot be exported or its
    export disagrees with torch."""
    folder = export_dir(tower) if folder is None else Path(folder)
    fp = tower.fingerprint()
    if _record_ok(folder, fp):
        return folder / "tower.onnx"
    with _locked(folder):
        if _record_ok(folder, fp):  # another process exported it while we waited
            return folder / "tower.onnx"
        (folder / "tower.json").unlink(missing_ok=True)  # the record goes first, the graph is rewritten
        was = tower.training
        tower.eval()
        try:
            data = _export_bytes(tower, tower.preprocess.size)
            atomic_write(folder / "tower.onnx", data)
            err = _agreement(tower, folder / "tower.onnx", tower.preprocess.size)
        except Exception as e:  # the exporter's errors are many and long: keep the first line
            raise LittuneError(f"cannot export {tower.name} to ONNX ({first_line(e)})") from None
        finally:
            tower.train(was)
        if not err <= EXPORT_TOLERANCE:
            raise LittuneError(f"the ONNX export of {tower.name} disagrees with torch (relative error {err:.2g})")
        write_json(folder / "tower.json", {"fingerprint": fp, "bytes": len(data),
                                            "sha256": hash_file(folder / "tower.onnx"), "opset": OPSET,
                                            "torch": torch.__version__, "relative_error": err})
    return folder / "tower.onnx"


# ---------------------------------------------------------------------------------------------
def _onnxruntime_available() -> str | None:
    """None if onnxruntime imports, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'littune[onnx]')"
    return None


def open_runner(tower, runtime: str = "auto", device=None, threads: int | None = None, quiet: bool = False):
    """A :class:`TorchRunner` or :class:`ONNXRunner` for the locked ``tower`` (see the module doc).

    ``threads``: onnxruntime intra-op threads per call (torch's are set by the caller). With ``auto``
    a tower that cannot take onnxruntime falls back to torch, saying why in one line (``quiet``: not)."""
    check_runtime(runtime)
    dev = _device(tower, device)
    from .onnx import ONNXTower

    if isinstance(tower, ONNXTower):
        if runtime == "torch":
            raise LittuneError(f"{tower.name} is an ONNX graph: it runs on onnxruntime only (use --runtime auto)")
        return _OwnSession(tower)
    if runtime == "torch" or (runtime == "auto" and dev.type != "cpu"):
        return TorchRunner(tower, dev)
    if dev.type != "cpu":
        raise LittuneError(f"--runtime onnxruntime runs on the CPU; the tower is on {dev} (use --runtime torch)")
    why = _onnxruntime_available()
    if why is None:
        try:
            return ONNXRunner(export_onnx(tower), threads)
        except LittuneError as e:
            why = str(e)
    if runtime == "onnxruntime":
        raise LittuneError(why)
    if not quiet:
        _say(f"runtime torch for {tower.name}: {why}")
    return TorchRunner(tower, dev)


class _OwnSession:
    """An ``onnx:`` tower: already a graph on onnxruntime, with its own session and pooling."""

    name = "onnxruntime"

    def __init__(self, tower):
        self.tower = tower

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        return self.tower(pixels).float().numpy()

    def close(self) -> None:
        pass
