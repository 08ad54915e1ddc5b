"""Contrastive losses for two-tower image-text training, global over all ranks.

Both losses compare this rank's image embeddings with the text embeddings of *every* rank (and
vice versa): features are all-gathered with ``torch.distributed.nn.functional.all_gather``, which
carries gradients back to the rank that produced them. Each rank computes the loss of its own rows;
the mean over ranks (what DDP's gradient averaging produces) is exactly the loss of one process on
the concatenated global batch, and so are the gradients. With one process (or no process group)
nothing is gathered.

* softmax: CLIP/LiT's symmetric cross-entropy, image->text and text->image, averaged.
* sigmoid: SigLIP's pairwise binary loss, ``-log sigmoid(z_ij * (t * <x_i, y_j> + b))`` summed over
  all pairs and divided by the global batch size, ``z_ij = +1`` on matching pairs, ``-1`` elsewhere.

Both come in two forms with the same value and gradients (to float rounding). The full form builds
this rank's ``n x N`` logit matrices (``N`` the global batch) and lets autograd keep them. The chunked
form (``chunk`` rows at a time, :mod:`littune.train.chunked_loss`) never holds more than ``chunk x N`` logits:
its forward keeps only each row's log-sum-exp, its backward recomputes each chunk's logits, so the
memory of the loss is O(N x chunk) instead of O(N^2): the loss no longer limits the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .chunked_loss import chunked_sigmoid, chunked_softmax

LOSSES = ("softmax", "sigmoid")


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, differentiably (rank order)."""
    rank, size = world()
    if size == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public way
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


class ContrastiveLoss(nn.Module):
    """The image-text contrastive loss, ``softmax`` (default) or ``sigmoid``; global over ranks.

    ``forward(image_emb, text_emb, logit_scale, logit_bias=None)`` takes L2-normalised local
    embeddings of matching pairs (row i of each is a pair) and the *log* temperature; it returns this
    rank's share of the global loss (the mean over ranks equals the global loss).

    ``chunk`` > 0 computes it ``chunk`` rows at a time whenever this rank holds more rows than that
    (memory O(N x chunk), the same value and gradients); 0 always builds the full matrices.
    """

    def __init__(self, kind: str = "softmax", chunk: int = 0):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")
        if chunk < 0:
            raise ValueError(f"loss chunk must be >= 0 (0: the full matrix), got {chunk}")
        self.kind, self.chunk = kind, chunk

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank, size = world()
        n_local = image_emb.shape[0]
        all_images = gather_with_grad(image_emb)
        all_texts = gather_with_grad(text_emb)
        scale = logit_scale.exp()
        if self.kind == "sigmoid" and logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit bias (LiTModel with loss='sigmoid')")
        if self.chunk and n_local > self.chunk:
            first = rank * n_local  # the global column of this rank's first row's match
            if self.kind == "softmax":
                return chunked_softmax(image_emb, text_emb, all_images, all_texts, scale, first, self.chunk)
            return chunked_sigmoid(image_emb, all_texts, scale, logit_bias, first, self.chunk)
        # This rank's rows against every column of the global batch.
        logits_i2t = scale * image_emb @ all_texts.t()
        logits_t2i = scale * text_emb @ all_images.t()
        if self.kind == "softmax":
            labels = torch.arange(n_local, device=image_emb.device) + rank * n_local
            return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        logits = logits_i2t + logit_bias
        targets = -torch.ones_like(logits)
        idx = torch.arange(n_local, device=logits.device)
        targets[idx, idx + rank * n_local] = 1.0
        # Sum over all pairs of this rank's rows, over the *local* batch size: the mean over ranks
        # is then the sum over all global pairs divided by the global batch size (SigLIP's loss).
        return -F.logsigmoid(targets * logits).sum() / n_local
