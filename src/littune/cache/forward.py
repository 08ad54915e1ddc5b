"""The locked tower as one function: a batch of pixels in, a float32 feature matrix out.

The cache writer calls the tower only through :func:`tower_forward`'s result, from one or more
forward lanes (threads) at once, so whatever runs the tower -- torch eager here -- plugs in at this
one place: ``forward(pixels: torch.Tensor (B, 3, S, S)) -> np.ndarray (B, dim) float32``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LittuneError


def tower_device(tower: torch.nn.Module) -> torch.device:
    """Where the tower's weights are (a tower without any: the CPU)."""
    for p in tower.parameters():
        return p.device
    for b in tower.buffers():
        return b.device
    return torch.device("cpu")


class TowerForward:
    """``forward(pixels)``: the tower's features of a batch under ``torch.inference_mode()``.

    Called from several lanes at once (it holds no state that a call changes). Checks that the tower
    gives ``(batch, dim)`` features."""

    def __init__(self, tower: torch.nn.Module, device: torch.device, dim: int, name: str):
        self.tower, self.device, self.dim, self.name = tower, device, dim, name

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            y = self.tower(pixels.to(self.device, non_blocking=True))
        if y.ndim != 2 or y.shape[-1] != self.dim:
            raise LittuneError(f"image tower {self.name} returned shape {tuple(y.shape)}, "
                               f"expected (batch, {self.dim})")
        return y.float().cpu().numpy()


def tower_forward(tower: torch.nn.Module, device: str | torch.device | None = None) -> TowerForward:
    """The forward function of the (eval-mode, locked) ``tower`` on ``device`` (default: where its
    weights are; the tower is moved there)."""
    dev = torch.device(device) if device is not None else tower_device(tower)
    if dev != tower_device(tower):
        tower.to(dev)
    return TowerForward(tower, dev, int(tower.dim), getattr(tower, "name", type(tower).__name__))
