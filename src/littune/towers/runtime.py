"""Runtimes for locked image towers: the same features, computed as fast as this machine allows.

A locked tower's outputs never change, so *how* they are computed is free to choose. littune runs a
locked tower over images (``littune embed``, ``littune index``, evaluation from images) through a
:class:`Runner`, ``runner(pixels) -> (B, D) float32 numpy``:

* ``onnxruntime`` (CPU): the tower is exported with ``torch.onnx.export`` (TorchScript unless
  ``$LITTUNE_ONNX_EXPORTER=dynamo``; dynamo as the fallback, :mod:`littune.towers.exporters`; ``tower.json``
  names the exporter and opset) once per tower fingerprint into littune's cache folder (``$LITTUNE_CACHE/towers`` or ``~/.cache/littune/towers``),
  written atomically and checked on every load (size, sha256, the fingerprint it belongs to); a file
  that is missing, corrupt or from another tower is exported again. Right after an export the graph's
  outputs are compared with torch's on two inputs; an export that disagrees is not used. An
  ``onnx:`` tower already is an ONNX graph and runs as it is.
* ``torch``: eval mode under ``inference_mode``; convolutional towers in ``channels_last`` memory
  format; on CUDA under float16 autocast.

With ``spatial`` (a function ``spatial(tower, pixels) -> (pooled, map)``, e.g. from
:func:`littune.towers.spatial.spatial_features`: what ``littune embed --tokens`` stores) a runner returns
``(features, map)`` from one forward pass: torch calls ``spatial``; onnxruntime runs a second export of the
tower (``tower-map.onnx`` beside ``tower.onnx``) whose graph has both outputs, checked against torch alike.

``auto`` (the default) takes onnxruntime on a CPU when the tower exports, torch otherwise (CUDA, or a
tower that cannot be exported: one line says why). The runtime never changes the tower's fingerprint:
features from both agree far inside the float16 rounding the cache stores (tested: cosine > 0.99999).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from ..errors import LittuneError
from ..fileio import atomic_write, cache_home, write_json
from ..hashing import hash_file, hash_text
from .exporters import describe, graph_opset, onnx_bytes, with_fallback

RUNTIMES = ("auto", "torch", "onnxruntime")
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

    def __init__(self, tower: torch.nn.Module, device=None, autocast: bool = True, spatial=None):
        self.tower, self.device, self.spatial = tower, _device(tower, device), spatial
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
            if self.spatial is not None:
                y, fmap = self.spatial(self.tower, x)
                return y.float().cpu().numpy(), fmap.float().cpu()
            y = self.tower(x)
        return y.float().cpu().numpy()

    def close(self) -> None:
        """Give the tower back in the default memory format."""
        if self.channels_last:
            self.tower.to(memory_format=torch.contiguous_format)


class ONNXRunner:
    """An ONNX graph of the tower on onnxruntime's CPU provider, ``threads`` intra-op threads.

    One session serves concurrent calls (onnxruntime releases the GIL), so several forward lanes of
    one thread each run in parallel, as torch's lanes do. A graph with two outputs (features and map)
    gives both, as a tuple."""

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
        self.outputs = len(self.session.get_outputs())

    def __call__(self, pixels: torch.Tensor):
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        y = [np.asarray(o, dtype=np.float32) for o in self.session.run(None, {self.input: x})]
        return y[0] if self.outputs == 1 else tuple(y)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
def export_dir(tower) -> Path:
    """Where the ONNX export of ``tower`` is kept: one folder per tower fingerprint."""
    return cache_home() / "towers" / hash_text(tower.fingerprint())[:24]


def _record_ok(folder: Path, fingerprint: str, stem: str = "tower") -> bool:
    """Is ``folder`` a complete export ``stem.onnx`` of the tower ``fingerprint`` (record, size, checksum)?"""
    try:
        rec = json.loads((folder / f"{stem}.json").read_text())
        onnx_file = folder / f"{stem}.onnx"
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


def first_line(e: Exception) -> str:
    """``Type: first line of the message``: the exporter's errors are many and long (a torch.onnx step
    error with its cause's, :func:`littune.towers.exporters.describe`)."""
    return describe(e)


class _WithMap(torch.nn.Module):
    """The tower with two outputs, from one pass: ``spatial(tower, pixels)`` (features, map)."""

    def __init__(self, tower: torch.nn.Module, spatial):
        super().__init__()
        self.tower, self.spatial = tower, spatial

    def forward(self, pixels: torch.Tensor):
        return tuple(self.spatial(self.tower, pixels))


def _export_bytes(tower: torch.nn.Module, size: int, spatial=None, exporter: str = "torchscript") -> bytes:
    """The tower as ONNX bytes (with ``spatial``: outputs features and map), batch axis dynamic."""
    outputs = ["features"] if spatial is None else ["features", "map"]
    module = tower if spatial is None else _WithMap(tower, spatial).train(tower.training)  # a new module trains
    return onnx_bytes(module, (torch.zeros(2, 3, size, size),), ["pixels"], outputs,
                      {"pixels": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, exporter=exporter)


def _agreement(tower: torch.nn.Module, path: Path, size: int, spatial=None) -> float:
    """Largest |ONNX - torch| on two seeded inputs, relative to the largest |torch| output (each output)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = [tower(x)] if spatial is None else list(spatial(tower, x))
    want = [w.float().numpy() for w in want]
    got = ONNXRunner(path, threads=1)(x)
    got = [got] if spatial is None else list(got)
    if [g.shape for g in got] != [w.shape for w in want]:
        return float("inf")
    return max(float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-12)) for g, w in zip(got, want))


def _write_checked(tower, path: Path, spatial, exporter: str) -> tuple[int, float]:
    """Export ``tower`` to ``path`` with ``exporter`` and compare it with torch: ``(bytes, relative error)``;
    one :class:`LittuneError` line if either fails."""
    was = tower.training
    tower.eval()
    try:
        data = _export_bytes(tower, tower.preprocess.size, spatial, exporter)
        atomic_write(path, data)
        err = _agreement(tower, path, tower.preprocess.size, spatial)
    except LittuneError:
        raise
    except Exception as e:  # the exporter's errors are many and long: keep the first line
        raise LittuneError(f"cannot export {tower.name} to ONNX ({first_line(e)})") from None
    finally:
        tower.train(was)
    if not err <= EXPORT_TOLERANCE:
        raise LittuneError(f"the ONNX export of {tower.name} disagrees with torch (relative error {err:.2g})")
    return len(data), err


def export_onnx(tower, folder: Path | None = None, spatial=None, exporter: str | None = None) -> Path:
    """The tower's ONNX file, exported now unless a complete, matching export is kept already (``spatial``:
    the graph with a second output, the map, ``tower-map.onnx``; see the module doc). ``exporter``:
    :data:`littune.towers.exporters.EXPORTERS`; None: ``$LITTUNE_ONNX_EXPORTER`` or the default (TorchScript),
    with the other as fallback (:func:`littune.towers.exporters.with_fallback`). A kept export is used whichever
    exporter wrote it (its record says which).

    Raises :class:`LittuneError` (one line, the reason) if the tower cannot be exported or its
    export disagrees with torch."""
    folder = export_dir(tower) if folder is None else Path(folder)
    fp, stem = tower.fingerprint(), "tower" if spatial is None else "tower-map"
    if _record_ok(folder, fp, stem):
        return folder / f"{stem}.onnx"
    with _locked(folder):
        if _record_ok(folder, fp, stem):  # another process exported it while we waited
            return folder / f"{stem}.onnx"
        (folder / f"{stem}.json").unlink(missing_ok=True)  # the record goes first, the graph is rewritten
        (size, err), used = with_fallback(lambda name: _write_checked(tower, folder / f"{stem}.onnx", spatial, name),
                                          f"the ONNX export of {tower.name}", exporter)
        write_json(folder / f"{stem}.json", {"fingerprint": fp, "bytes": size,
                                              "sha256": hash_file(folder / f"{stem}.onnx"),
                                              "opset": graph_opset((folder / f"{stem}.onnx").read_bytes()),
                                              "exporter": used, "torch": torch.__version__, "relative_error": err})
    return folder / f"{stem}.onnx"


# ---------------------------------------------------------------------------------------------
def _onnxruntime_available() -> str | None:
    """None if onnxruntime imports, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'littune[onnx]')"
    return None


def open_runner(tower, runtime: str = "auto", device=None, threads: int | None = None, quiet: bool = False,
                spatial=None):
    """A :class:`TorchRunner` or :class:`ONNXRunner` for the locked ``tower`` (see the module doc).

    ``threads``: onnxruntime intra-op threads per call (torch's are set by the caller). With ``auto``
    a tower that cannot take onnxruntime falls back to torch, saying why in one line (``quiet``: not).
    ``spatial``: the runner gives ``(features, map)`` (see the module doc)."""
    check_runtime(runtime)
    dev = _device(tower, device)
    from .onnx import ONNXTower

    if isinstance(tower, ONNXTower):
        if runtime == "torch":
            raise LittuneError(f"{tower.name} is an ONNX graph: it runs on onnxruntime only (use --runtime auto)")
        if spatial is not None:
            raise LittuneError(f"{tower.name} is an ONNX graph: littune reads no spatial map from it")
        return _OwnSession(tower)
    if runtime == "torch" or (runtime == "auto" and dev.type != "cpu"):
        return TorchRunner(tower, dev, spatial=spatial)
    if dev.type != "cpu":
        raise LittuneError(f"--runtime onnxruntime runs on the CPU; the tower is on {dev} (use --runtime torch)")
    why = _onnxruntime_available()
    if why is None:
        try:
            return ONNXRunner(export_onnx(tower, spatial=spatial), threads)
        except LittuneError as e:
            why = str(e)
    if runtime == "onnxruntime":
        raise LittuneError(why)
    if not quiet:
        _say(f"runtime torch for {tower.name}: {why}")
    return TorchRunner(tower, dev, spatial=spatial)


class _OwnSession:
    """An ``onnx:`` tower: already a graph on onnxruntime, with its own session and pooling."""

    name = "onnxruntime"

    def __init__(self, tower):
        self.tower = tower

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        return self.tower(pixels).float().numpy()

    def close(self) -> None:
        pass
