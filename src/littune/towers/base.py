"""The image-tower interface every adapter implements, and the two helpers adapters share.

:class:`ImageTower` is what :class:`~littune.model.LiTModel` and the embedding cache see of a tower:
``forward(pixels) -> (B, D)`` image features, ``dim``, the :class:`~littune.data.preprocess.Preprocess`
spec, a JSON-able ``spec`` that rebuilds it and a ``fingerprint()`` that keys the embedding cache.
The adapters live in :mod:`littune.towers.image` (EfficientNet-Lite, Hugging Face, torch factories)
and :mod:`littune.towers.onnx`; both import this module and nothing imports them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..hashing import hash_state_dict, hash_text
from ..data.preprocess import Preprocess


class ImageTower(nn.Module):
    """Base class. Subclasses set ``spec``, ``preprocess``, ``name`` and implement ``forward``."""

    spec: dict
    preprocess: Preprocess
    name: str
    #: stored by reference (name + fingerprint) rather than copied, when locked.
    by_reference: bool = False
    #: False for towers that cannot be trained (ONNX).
    trainable: bool = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def dim(self) -> int:
        if not hasattr(self, "_dim"):
            with torch.no_grad():
                was = self.training
                self.eval()
                x = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size)
                self._dim = int(self.forward(x).shape[-1])
                self.train(was)
        return self._dim

    def weights_hash(self) -> str:
        return hash_state_dict(self.state_dict())

    def fingerprint(self) -> str:
        """``name|w=<weights sha256 prefix>|p=<preprocessing hash>``: keys the embedding cache."""
        return f"{self.name}|w={self.weights_hash()[:16]}|p={hash_text(self.preprocess.key())[:8]}"

    def extra_files(self, directory: Path) -> dict:
        """Write what a saved model needs besides weights; return the spec that reloads it."""
        return dict(self.spec)


def _reinit(module: nn.Module) -> None:
    """Random initialisation (the ``u`` letter): every submodule's own ``reset_parameters``."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _pool(out: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce a tower output to (B, D): feature maps are averaged, token sequences pooled (``cls``: the first
    token; ``mean``: the mean of the others; ``cls+mean``: both side by side, (B, 2D), as dino.txt reads a ViT)."""
    if out.ndim == 4:  # (B, C, H, W)
        return out.mean(dim=(2, 3))
    if out.ndim == 3 and pooling == "cls+mean":
        return torch.cat([out[:, 0], out[:, 1:].mean(dim=1)], dim=-1)
    if out.ndim == 3:  # (B, tokens, D)
        return out[:, 0] if pooling == "cls" else out[:, 1:].mean(dim=1)
    return out.flatten(1)
