"""Gradient accumulation (GradCache): the gradients of one graph over all micro-batches, dropout and BatchNorm included."""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from littune.train.accumulate import accumulated_backward
from littune.train.losses import ContrastiveLoss


def _towers():
    torch.manual_seed(0)
    image = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    text = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 4))
    scale = nn.Parameter(torch.tensor(math.log(10.0)))
    return nn.ModuleDict({"image": image, "text": text}), scale


def test_accumulated_backward_equals_one_graph_over_the_micro_batches():
    """3 micro-batches: the same loss, gradients (towers and temperature), BatchNorm statistics and random
    state after the step as embedding the micro-batches one after another in one graph. Dropout masks
    are replayed, so the re-embedded micro-batches are what the loss saw."""
    x, y = torch.randn(12, 6), torch.randn(12, 5)
    loss_fn = ContrastiveLoss()
    runs = []
    for accumulate in (False, True):
        towers, scale = _towers()
        towers.train()

        def embed(sl):
            return F.normalize(towers["image"](x[sl]), dim=-1), F.normalize(towers["text"](y[sl]), dim=-1)

        torch.manual_seed(1)
        if accumulate:
            loss = accumulated_backward(towers, embed, lambda i, t: loss_fn(i, t, scale), 12, 3, torch.device("cpu"))
        else:
            parts = [embed(slice(j * 4, (j + 1) * 4)) for j in range(3)]
            loss = loss_fn(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), scale)
            loss.backward()
        grads = [p.grad.clone() for p in [*towers.parameters(), scale]]
        runs.append((loss.detach(), grads, copy.deepcopy(dict(towers.named_buffers())), torch.rand(3)))
    (loss1, grads1, bufs1, rng1), (loss2, grads2, bufs2, rng2) = runs
    assert torch.allclose(loss1, loss2, atol=1e-6)
    for g1, g2 in zip(grads1, grads2):
        assert g1.abs().sum() > 0 and torch.allclose(g1, g2, atol=1e-6)
    assert bufs2["image.1.num_batches_tracked"].item() == 3
    for name in bufs1:
        assert torch.allclose(bufs1[name].float(), bufs2[name].float(), atol=1e-6), name
    assert torch.equal(rng1, rng2)
