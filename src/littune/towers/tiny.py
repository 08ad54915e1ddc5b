"""A tiny, deterministic convolutional image tower for tests, smoke runs and examples.

``torch:littune.towers.tiny:tiny_cnn`` builds a 3-stage CNN with BatchNorm whose "pre-trained"
weights are a fixed seeded initialisation, so every process builds bit-identical weights (and the
same fingerprint) without any download. It is not a good image model; it is a fast real one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

SPEC = {"type": "torch", "factory": "littune.towers.tiny:tiny_cnn",
        "preprocess": {"size": 32, "resize": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def tiny_cnn(width: int = 16, dim: int = 32, seed: int = 0) -> nn.Module:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim), nn.ReLU(),
        )
        # Non-trivial BatchNorm statistics, as a trained network has.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    finally:
        torch.random.set_rng_state(gen_state)
    return net
