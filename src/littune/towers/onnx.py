"""An ONNX image tower through onnxruntime: usable locked only (no trainable weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from ..hashing import hash_file, hash_text
from ..preprocess import Preprocess
from .base import ImageTower, _pool


class ONNXTower(ImageTower):
    trainable = False

    def __init__(self, path: str, preprocess: dict | None = None, pooling: str = "cls", output: int = 0):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover
            raise ImportError("ONNX image towers need `pip install 'littune[onnx]'` (onnxruntime)") from e
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        self.path = path
        self.name = f"onnx:{path.name}"
        self.pooling = pooling
        self.output = int(output)
        self.spec = {"type": "onnx", "path": str(path), "preprocess": dict(preprocess or {}),
                     "pooling": pooling, "output": self.output}
        self.preprocess = Preprocess.from_dict(preprocess or {})
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self._file_hash = hash_file(path)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.detach().to("cpu", torch.float32).numpy()
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[self.output]
        return _pool(torch.from_numpy(np.asarray(out, dtype=np.float32)), self.pooling).to(pixels.device)

    def weights_hash(self) -> str:
        return self._file_hash

    def fingerprint(self) -> str:
        return f"{self.name}|w={self._file_hash[:16]}|p={hash_text(self.preprocess.key())[:8]}"

    def extra_files(self, directory: Path) -> dict:
        sub = directory / "image_tower"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, sub / "model.onnx")
        return {**self.spec, "path": "image_tower/model.onnx", "relative": True}
