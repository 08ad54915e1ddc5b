"""Gradient accumulation that keeps the contrastive batch global (GradCache, Gao et al. 2021).

A contrastive loss couples every pair of the batch, so micro-batches cannot simply be summed. Here a
step with ``k`` micro-batches is three passes:

1. embed every micro-batch without gradient (no activations kept);
2. compute the loss of the *whole* batch on those embeddings, once, and its gradient with respect
   to each embedding (and to the temperature and bias, which get theirs here, once per step);
3. re-embed each micro-batch with gradient and back-propagate the slice of that embedding gradient.

By the chain rule the summed gradients equal those of one step on the whole batch; only one
micro-batch's activations are alive at a time, and with the chunked loss the loss needs
O(batch x chunk), so the batch is limited by time. Pass 3 must compute exactly what pass 1 did:

* randomness (dropout) is replayed: each micro-batch's random state is saved before pass 1 and
  restored before pass 3, so both draw the same masks;
* BatchNorm running statistics of a tower in train mode would move in both passes, twice per
  micro-batch. They are saved before pass 1 and put back after it, so they move once per micro-batch,
  in pass 3. (Pass 1 stays in train mode: in eval mode BatchNorm would normalise with the running
  statistics and pass 1's embeddings would not be pass 3's. Momentum 0 would keep the means but still
  count ``num_batches_tracked``, which a ``momentum=None`` layer uses as its averaging factor.)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn


@contextmanager
def batchnorm_stats_kept(module: nn.Module):
    """Within the block, BatchNorm layers of ``module`` normalise as usual; their running statistics
    (mean, variance, batches tracked) are put back as they were on exit."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    saved = [{n: b.clone() for n, b in m.named_buffers(recurse=False) if b is not None} for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(layers, saved):
                for n, value in buffers.items():
                    getattr(m, n).copy_(value)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_backward(model: nn.Module, embed: Callable, loss_fn: Callable, n: int, k: int,
                         device: torch.device) -> torch.Tensor:
    """Gradients of ``loss_fn(image_emb, text_emb)`` over a batch of ``n`` rows, embedded in ``k``
    micro-batches by ``embed(slice) -> (image_emb, text_emb)``; returns the (detached) loss."""
    m = n // k
    parts = [slice(j * m, (j + 1) * m) for j in range(k)]
    states, images, texts = [], [], []
    with torch.no_grad(), batchnorm_stats_kept(model):
        for sl in parts:
            states.append(_rng_state(device))
            img, txt = embed(sl)
            images.append(img)
            texts.append(txt)
    image_emb = torch.cat(images).requires_grad_()
    text_emb = torch.cat(texts).requires_grad_()
    loss = loss_fn(image_emb, text_emb)
    loss.backward()
    del images, texts
    for sl, state in zip(parts, states):
        _set_rng_state(state, device)
        img, txt = embed(sl)
        live = [(e, g.grad[sl]) for e, g in ((img, image_emb), (txt, text_emb)) if e.requires_grad]
        if live:
            torch.autograd.backward([e for e, _ in live], [g for _, g in live])
    return loss.detach()
