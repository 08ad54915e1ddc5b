"""An ONNX image tower through onnxruntime: usable locked only (no trainable weights).

The tower reads one output of the graph (``output``: a name or an index, the first graph output by
default) and pools it to ``(B, D)``: ``cls`` takes the first token of a ``(B, tokens, D)`` output,
``mean`` averages the tokens after it, ``none`` flattens; a ``(B, C, H, W)`` map is averaged over
its positions whatever the pooling. The output may be an intermediate node of a larger graph (the
feature layer of a classifier, a backbone's last layer norm): it is then added to the graph's
outputs in memory, the file on disk untouched. The fingerprint covers the file's bytes, the output
read and the pooling (a file read at its first output with ``cls`` keeps the plain ``onnx:FILE`` name).
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import LittuneError
from ..hashing import hash_file, hash_text
from ..data.preprocess import Preprocess
from .base import ImageTower, _pool

ONNX_POOLING = ("cls", "mean", "none")


def onnx_tower_name(path: str | Path, output: int | str = 0, pooling: str = "cls") -> str:
    """``onnx:FILE``, with ``#output=NAME&pool=P`` when another output or pooling is read."""
    name = f"onnx:{Path(path).name}"
    if (output, pooling) == (0, "cls"):
        return name
    return f"{name}#output={output}&pool={pooling}"


class ONNXTower(ImageTower):
    trainable = False

    def __init__(self, path: str, preprocess: dict | None = None, pooling: str = "cls", output: int | str = 0):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover
            raise ImportError("ONNX image towers need `pip install 'littune[onnx]'` (onnxruntime)") from e
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        if pooling not in ONNX_POOLING:
            raise LittuneError(f"onnx:{path.name}: pool must be one of {'|'.join(ONNX_POOLING)}, not {pooling!r}")
        output = int(output) if isinstance(output, int) or str(output).isdigit() else str(output)
        self.path, self.pooling, self.output = path, pooling, output
        self.name = onnx_tower_name(path, output, pooling)
        self.spec = {"type": "onnx", "path": str(path), "preprocess": dict(preprocess or {}),
                     "pooling": pooling, "output": output}
        self.preprocess = Preprocess.from_dict(preprocess or {})
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        outputs = [o.name for o in self.session.get_outputs()]
        if isinstance(output, int):
            if output >= len(outputs):
                raise LittuneError(f"onnx:{path.name} has {len(outputs)} output(s) ({', '.join(outputs)}); "
                                   f"there is no output {output}")
            self.output_name = outputs[output]
        else:
            self.output_name = output
            if output not in outputs:  # an intermediate node's output: expose it
                self.session = ort.InferenceSession(_with_output(path, output), providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._file_hash = hash_file(path)

    def read(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output the tower reads, before pooling (float32, on the CPU)."""
        x = pixels.detach().to("cpu", torch.float32).numpy()
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def pool(self, out: torch.Tensor) -> torch.Tensor:
        """The read output to ``(B, D)``: a map averaged, tokens pooled (``cls``/``mean``) or flattened (``none``)."""
        if self.pooling == "none" and out.ndim != 4:
            return out.flatten(1)
        return _pool(out, self.pooling)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.read(pixels)).to(pixels.device)

    def graph(self):
        """The tower's ONNX graph cut down to its input and the output it reads (an ``onnx.ModelProto``)."""
        import onnx
        from onnx.utils import Extractor

        model = onnx.load(str(self.path))
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference is optional, as in _with_output
            pass
        known = {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
        if self.output_name not in known:  # an output of unknown type: a float tensor of unknown shape
            model.graph.value_info.append(
                onnx.helper.make_tensor_value_info(self.output_name, onnx.TensorProto.FLOAT, None))
        return Extractor(model).extract_model([self.input_name], [self.output_name])

    def weights_hash(self) -> str:
        return self._file_hash

    def fingerprint(self) -> str:
        return f"{self.name}|w={self._file_hash[:16]}|p={hash_text(self.preprocess.key())[:8]}"

    def extra_files(self, directory: Path) -> dict:
        sub = directory / "image_tower"
        sub.mkdir(parents=True, exist_ok=True)
        # Under its own file name: the name is part of the fingerprint the reloaded model checks.
        shutil.copyfile(self.path, sub / self.path.name)
        return {**self.spec, "path": f"image_tower/{self.path.name}", "relative": True}


def _with_output(path: Path, name: str) -> bytes:
    """The graph in ``path`` with the node output ``name`` added to its outputs, as bytes."""
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading the inner output {name!r} of onnx:{path.name} needs `pip install onnx`") from e
    model = onnx.load(str(path))
    produced = [o for node in model.graph.node for o in node.output if o]
    if name not in produced:
        raise LittuneError(_no_such_output(path, name, [o.name for o in model.graph.output], produced))
    try:  # the output's type (and shape where known) from shape inference
        known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    except Exception:  # noqa: BLE001 - inference is optional; a float output of unknown shape works too
        known = {}
    info = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(info)
    return model.SerializeToString()


def _no_such_output(path: Path, name: str, graph_outputs: list[str], produced: list[str]) -> str:
    close = difflib.get_close_matches(name, produced, n=3, cutoff=0.4)
    some = close or produced[-3:]
    return (f"onnx:{path.name} has no output {name!r}: its graph outputs are {', '.join(graph_outputs)}; "
            f"node outputs include {', '.join(some)} ({len(produced)} in all)")
