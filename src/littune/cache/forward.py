"""The locked tower as one function: a batch of pixels in, a float32 feature matrix out.

The cache writer calls the tower only through :func:`tower_forward`'s result, from one or more
forward lanes (threads) at once. What computes it is a :mod:`littune.towers.runtime` runner: onnxruntime
on a CPU when the tower exports, torch otherwise (``runtime``: auto, torch or onnxruntime).
``forward(pixels: torch.Tensor (B, 3, S, S)) -> np.ndarray (B, dim) float32``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LittuneError
from ..towers.runtime import module_device, open_runner


class TowerForward:
    """``forward(pixels)``: the tower's features of a batch, computed by ``runner``.

    Called from several lanes at once (it holds no state that a call changes). Checks that the tower
    gives ``(batch, dim)`` features. ``runtime`` names what computes them; :meth:`close` gives the
    tower back as it was."""

    def __init__(self, runner, dim: int, name: str):
        self.runner, self.dim, self.name = runner, dim, name
        self.runtime: str = runner.name

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        y = self.runner(pixels)
        if y.ndim != 2 or y.shape[-1] != self.dim:
            raise LittuneError(f"image tower {self.name} returned shape {tuple(y.shape)}, "
                               f"expected (batch, {self.dim})")
        return y

    def close(self) -> None:
        self.runner.close()


def tower_forward(tower: torch.nn.Module, device: str | torch.device | None = None, runtime: str = "auto",
                  threads: int | None = None) -> TowerForward:
    """The forward function of the (eval-mode, locked) ``tower`` on ``device`` (default: where its
    weights are; the tower is moved there) through ``runtime``; ``threads``: onnxruntime's intra-op
    threads per call (torch's are the process's)."""
    dev = torch.device(device) if device is not None else module_device(tower)
    dim = int(tower.dim)
    runner = open_runner(tower, runtime, device=dev, threads=threads)
    return TowerForward(runner, dim, getattr(tower, "name", type(tower).__name__))
