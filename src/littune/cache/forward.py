"""The locked tower as one function: a batch of pixels in, a float32 feature matrix out.

The cache writer calls the tower only through :func:`tower_forward`'s result, from one or more
forward lanes (threads) at once. What computes it is a :mod:`littune.towers.runtime` runner: onnxruntime
on a CPU when the tower exports, torch otherwise (``runtime``: auto, torch or onnxruntime).
``forward(pixels: torch.Tensor (B, 3, S, S)) -> np.ndarray (B, dim) float32``; with a token spec
(:mod:`.tokens`) ``(features (B, dim), tokens (B / every, h*w, F))`` from the same pass, the tokens of every
``every``-th row only (the eval views).
"""

from __future__ import annotations

import torch

from ..errors import LittuneError
from ..towers.runtime import module_device, open_runner
from .tokens import pooled_and_map, to_grid


class TowerForward:
    """``forward(pixels)``: the tower's features of a batch, computed by ``runner``.

    Called from several lanes at once (it holds no state that a call changes). Checks that the tower
    gives ``(batch, dim)`` features. ``runtime`` names what computes them; :meth:`close` gives the
    tower back as it was."""

    def __init__(self, runner, dim: int, name: str, tokens: dict | None = None, every: int = 1):
        self.runner, self.dim, self.name = runner, dim, name
        self.tokens, self.every = tokens, every
        self.runtime: str = runner.name

    def __call__(self, pixels: torch.Tensor):
        y = self.runner(pixels)
        y, fmap = y if self.tokens else (y, None)
        if y.ndim != 2 or y.shape[-1] != self.dim:
            raise LittuneError(f"image tower {self.name} returned shape {tuple(y.shape)}, "
                               f"expected (batch, {self.dim})")
        if fmap is None:
            return y
        want = (*self.tokens["grid"], self.tokens["dim"])
        if fmap.ndim != 4 or fmap.shape[0] != y.shape[0] or (fmap.shape[-1] != want[-1]):
            raise LittuneError(f"image tower {self.name} gave a map of shape {tuple(fmap.shape)}, expected "
                               f"(batch, h, w, {want[-1]})")
        return y, to_grid(fmap, self.tokens["grid"], self.every)

    def close(self) -> None:
        self.runner.close()


def tower_forward(tower: torch.nn.Module, device: str | torch.device | None = None, runtime: str = "auto",
                  threads: int | None = None, tokens: dict | None = None, every: int = 1) -> TowerForward:
    """The forward function of the (eval-mode, locked) ``tower`` on ``device`` (default: where its
    weights are; the tower is moved there) through ``runtime``; ``threads``: onnxruntime's intra-op
    threads per call (torch's are the process's). ``tokens``: the token spec (:func:`.tokens.resolve`),
    stored for every ``every``-th row of a batch."""
    dev = torch.device(device) if device is not None else module_device(tower)
    dim = int(tower.dim)
    runner = open_runner(tower, runtime, device=dev, threads=threads, spatial=pooled_and_map if tokens else None)
    return TowerForward(runner, dim, getattr(tower, "name", type(tower).__name__), tokens, every)
