"""A real torch factory tower that counts its constructions and forward passes.

``{"type": "torch", "factory": "counting_tower:counted_cnn"}`` (tests/ is on the path): the tiny CNN
of :mod:`littune.towers.tiny` inside a module that appends to :data:`BUILT` when it is built and
counts its forward passes there, so a test can say how often the trainer built and ran its tower.
"""

import torch.nn as nn

from littune.towers.tiny import tiny_cnn

BUILT: list[int] = []  # one entry per construction: the forward passes that instance ran


class Counted(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.index = len(BUILT)
        BUILT.append(0)

    def forward(self, pixels):
        BUILT[self.index] += 1
        return self.net(pixels)


def counted_cnn(**kwargs) -> nn.Module:
    return Counted(tiny_cnn(**kwargs))
