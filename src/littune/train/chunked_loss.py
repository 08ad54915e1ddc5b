"""The contrastive losses a chunk of rows at a time: O(N x chunk) memory for a global batch of N.

The full losses (:class:`littune.train.losses.ContrastiveLoss`) build this rank's ``n x N`` logit matrix
and autograd keeps it, with its softmax or sigmoid, for the backward pass: O(N^2) memory over the
ranks, which is what limits the batch once the image tower is gone. Here each loss is an autograd
function over the embeddings, the scale ``t`` (already exponentiated) and the bias ``b``:

* softmax (one direction): ``sum_i logsumexp_j(t <x_i, y_j>) - t <x_i, y_{first+i}>``. The forward
  keeps only each row's log-sum-exp; the backward recomputes a chunk's logits and turns them into
  its gradient ``softmax - onehot`` (the only ``chunk x N`` buffers alive at any time).
* sigmoid: ``sum_ij -log sigmoid(z_ij (t <x_i, y_j> + b))``; the gradient of a logit is
  ``-z_ij sigmoid(-z_ij l_ij)``, again recomputed chunk by chunk.

From the logit gradient ``G`` of a chunk: ``dx = t G y``, ``dy += t G^T x``, ``dt = sum G <x, y>``,
``db = sum G``: the same value and gradients as the full matrix, to float rounding. Inputs are
float32 (the trainer casts embeddings out of autocast); autocast is switched off inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(n: int, chunk: int):
    for lo in range(0, n, chunk):
        yield lo, min(lo + chunk, n)


def _positives(m: torch.Tensor, lo: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the matching pairs of rows ``lo..lo+len(m)`` in a chunk's ``rows x N`` matrix."""
    r = torch.arange(m.shape[0], device=m.device)
    return r, r + first + lo


class _RowSoftmaxCE(torch.autograd.Function):
    """Sum over rows of x of the cross-entropy of ``t x y^T``, row i's label ``first + i``."""

    @staticmethod
    def forward(ctx, x, y, scale, first: int, chunk: int):
        lse = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
        pos = torch.empty_like(lse)
        for lo, hi in _chunks(x.shape[0], chunk):
            logits = (x[lo:hi] @ y.t()).mul_(scale)
            lse[lo:hi] = torch.logsumexp(logits, dim=1)
            pos[lo:hi] = logits[_positives(logits, lo, first)]
        ctx.save_for_backward(x, y, scale, lse)
        ctx.first, ctx.chunk = first, chunk
        return (lse - pos).sum()

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, lse = ctx.saved_tensors
        dx, dy = torch.empty_like(x), torch.zeros_like(y)
        dscale = torch.zeros((), dtype=x.dtype, device=x.device)
        for lo, hi in _chunks(x.shape[0], ctx.chunk):
            dots = x[lo:hi] @ y.t()
            g = (dots * scale).sub_(lse[lo:hi, None]).exp_()  # the softmax of each row
            g[_positives(g, lo, ctx.first)] -= 1.0
            dscale += (g * dots).sum()
            g.mul_(scale * grad)
            dx[lo:hi] = g @ y
            dy.addmm_(g.t(), x[lo:hi])
        return dx, dy, dscale * grad, None, None


class _SigmoidPairs(torch.autograd.Function):
    """``sum_ij -log sigmoid(z_ij (t <x_i, y_j> + b))``, ``z = +1`` at (i, first + i), else -1."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, first: int, chunk: int):
        total = torch.zeros((), dtype=x.dtype, device=x.device)
        for lo, hi in _chunks(x.shape[0], chunk):
            zl = (x[lo:hi] @ y.t()).mul_(scale).add_(bias).neg_()  # z * logit, z = -1 ...
            idx = _positives(zl, lo, first)
            zl[idx] = -zl[idx]  # ... but +1 on the matching pairs
            total -= F.logsigmoid(zl).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.first, ctx.chunk = first, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias = ctx.saved_tensors
        dx, dy = torch.empty_like(x), torch.zeros_like(y)
        dscale = torch.zeros((), dtype=x.dtype, device=x.device)
        dbias = torch.zeros_like(dscale)
        for lo, hi in _chunks(x.shape[0], ctx.chunk):
            dots = x[lo:hi] @ y.t()
            idx = _positives(dots, lo, ctx.first)
            g = (dots * scale).add_(bias)  # l, then -z l (z = -1 but +1 on the matching pairs) ...
            g[idx] = -g[idx]
            g = g.sigmoid_()  # ... then -z sigmoid(-z l) = d(-log sigmoid(z l)) / dl
            g[idx] = -g[idx]
            dbias += g.sum()
            dscale += (g * dots).sum()
            g.mul_(scale * grad)
            dx[lo:hi] = g @ y
            dy.addmm_(g.t(), x[lo:hi])
        return dx, dy, dscale * grad, dbias * grad, None, None


def chunked_softmax(image_emb, text_emb, all_images, all_texts, scale, first: int, chunk: int) -> torch.Tensor:
    """CLIP's symmetric softmax loss of this rank's rows (``first``: their first global index)."""
    with torch.autocast(image_emb.device.type, enabled=False):
        n = image_emb.shape[0]
        i2t = _RowSoftmaxCE.apply(image_emb.float(), all_texts.float(), scale.float(), first, chunk)
        t2i = _RowSoftmaxCE.apply(text_emb.float(), all_images.float(), scale.float(), first, chunk)
        return 0.5 * (i2t + t2i) / n


def chunked_sigmoid(image_emb, all_texts, scale, bias, first: int, chunk: int) -> torch.Tensor:
    """SigLIP's loss of this rank's rows over the *local* batch size (see :mod:`littune.train.losses`)."""
    with torch.autocast(image_emb.device.type, enabled=False):
        total = _SigmoidPairs.apply(image_emb.float(), all_texts.float(), scale.float(), bias.float(), first, chunk)
        return total / image_emb.shape[0]
