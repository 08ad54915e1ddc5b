"""The attention-pooling image head (``model.image_head: attention``): a readout of the locked tower's tokens.

A linear image head reads one vector per image, the tower's pooled features. The attention head reads the
tower's map laid out as tokens ``(B, T, F)`` (:func:`~littune.towers.spatial.spatial_features`, flattened;
a token cache's rows, :meth:`EmbeddingCache.tokens`) and pools them with a learned query (multi-head
attention pooling, as SigLIP's MAP head and dino.txt's readout do), optionally after one pre-norm
transformer block over the tokens (``model.image_head_blocks: 1``), then projects to ``embed_dim``::

    x = block(tokens)                       # image_head_blocks: 0 -> x = tokens
    z = mean_t(x) + gamma * attention_pool(x)
    embedding = proj(z)                     # then L2-normalised by the model

**It starts as the linear head.** ``gamma`` (one per channel, LayerScale) and the block's two residual
scales start at zero, and ``proj`` is a ``Linear(F, embed_dim)`` made first, from the same random numbers as
the linear head: at initialisation the head is exactly a linear head on the mean of the tokens -- for a
mean-pooled tower (EfficientNet-Lite, ``hf:...#mean``, ``torch:`` maps), the linear head on the tower's own
pooled features. Training moves ``gamma`` off zero by gradient (its gradient is the attention output's
projection on the loss gradient), so the attention can only be added where it lowers the loss: the head
starts no worse than linear, and the mean stays as a residual path.

**Heat maps** (:meth:`AttentionPoolHead.location_embeddings`): ``z`` is a sum over locations of each
location's share, ``x_t / T + gamma * W_o (a_{h,t} v_{h,t})_h + gamma * b_o / T`` (``a``: the query's
attention weights; they sum to 1 over the locations, so the value bias is a share too). ``proj(T * share_t)``
is each location's embedding, whose mean is the image's embedding before normalisation, exactly as the
linear head applied at each location is (:mod:`littune.inference.heatmap`). With a block, ``x_t`` has seen the other
locations.

The number of attention heads follows the token width: ``F // 64`` where 64 divides ``F``, else 1
(:func:`head_count`). The token width (the map's channels; a ``cls+mean`` tower's pooled features are
twice as wide) is the tower's ``token_dim`` (set by the trainer from a token cache) or found by running the
tower once on a blank image (:func:`token_dim`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LittuneError

#: the width of one attention head where it divides the token width
HEAD_WIDTH = 64
TOKEN_CACHE_NEEDED = ("model.image_head=attention trains from a token cache: littune embed ... --tokens "
                      "(this cache {where} holds pooled features only)")


def head_count(dim: int) -> int:
    return dim // HEAD_WIDTH if dim >= HEAD_WIDTH and dim % HEAD_WIDTH == 0 else 1


def reads_tokens(model) -> bool:
    """The model's image head reads the tower's tokens ``(B, T, F)`` rather than its pooled features."""
    return getattr(model.config, "image_head", "linear") == "attention"


def tower_tokens(tower, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, h*w, F)``: the tower's map for ``pixels``, row by row (one forward pass; a tower without a map
    in torch is one :class:`LittuneError` naming it)."""
    from ..towers.spatial import spatial_features

    fmap = spatial_features(tower, pixels).features
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])


def token_dim(tower) -> int:
    """The width ``F`` of the tower's tokens (:func:`tower_tokens`)."""
    found = getattr(tower, "token_dim", None)
    if found is None:
        with torch.no_grad():
            was = tower.training
            tower.eval()
            size = tower.preprocess.size
            found = int(tower_tokens(tower, torch.zeros(1, 3, size, size)).shape[-1])
            tower.train(was)
        tower.token_dim = found
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise LittuneError(f"the attention image head's token width must be a positive integer, not {found!r} "
                           "(image_token_dim in the model's config.json, or token_dim of the token cache)")
    return found


def cache_rows(cache, rows, tokens: bool):
    """A batch's image inputs from an embedding cache: its tokens ``(n, T, F)`` (the attention head) or its
    pooled features ``(n, F)``; a cache without tokens is refused for the attention head (one line)."""
    if not tokens:
        return cache.features(rows)
    check_token_cache(cache)
    return cache.tokens(rows)


def check_token_cache(cache) -> None:
    if not getattr(cache, "has_tokens", False):
        raise LittuneError(TOKEN_CACHE_NEEDED.format(where=getattr(cache, "directory", "")))


class _Block(nn.Module):
    """A pre-norm transformer block over the tokens whose two residual branches start scaled by zero."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.out = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.scale1, self.scale2 = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.scale1 * self.out((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.scale2 * self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """Tokens ``(B, T, F)`` -> ``(B, embed_dim)`` (see the module doc).

    One learned query per head, already through the key projection (``query[h]`` is ``W_k^h^T q_h``: with a
    single query the two are one vector, and the keys of ``T`` tokens cost ``T x F`` a head instead of
    ``T x F x F``); the value projection is applied after the pooling (it is linear, and the weights sum to 1),
    so pooling costs ``T x F`` an image a head and the projections ``F x F`` an image, not ``T x F x F``."""

    def __init__(self, dim_in: int, dim_out: int, blocks: int = 0):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)  # first: the same numbers as a linear head made at this point
        self.heads = head_count(dim_in)
        self.blocks = nn.ModuleList(_Block(dim_in, self.heads) for _ in range(blocks))
        self.query = nn.Parameter(torch.randn(self.heads, dim_in) * 0.02)
        self.norm = nn.LayerNorm(dim_in)
        self.value, self.out = nn.Linear(dim_in, dim_in), nn.Linear(dim_in, dim_in)
        self.gamma = nn.Parameter(torch.zeros(dim_in))

    @property
    def weight(self) -> torch.Tensor:  # the dtype callers cast the tokens to (as for a Linear head)
        return self.proj.weight

    def _attend(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, n, a)``: the block's tokens, their layer norm and the query's weights ``(B, heads, T)``."""
        if tokens.ndim != 3:
            raise LittuneError(f"the attention image head reads tokens (batch, tokens, {self.proj.in_features}), "
                               f"not {list(tokens.shape)}")
        x = tokens
        for block in self.blocks:
            x = block(x)
        n = self.norm(x)
        scale = math.sqrt(n.shape[-1] // self.heads)
        return x, n, torch.softmax(torch.einsum("btf,hf->bht", n, self.query) / scale, dim=-1)

    def _values(self) -> torch.Tensor:
        """``(heads, d, F)``: each head's rows of the value projection."""
        return self.value.weight.reshape(self.heads, -1, self.value.in_features)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, n, a = self._attend(tokens)
        pooled = torch.einsum("bht,btf->bhf", a, n)  # each head's weighted mean of the normed tokens
        v = torch.einsum("bhf,hdf->bhd", pooled, self._values()).reshape(x.shape[0], -1) + self.value.bias
        return self.proj(x.mean(dim=1) + self.gamma * self.out(v))

    def attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: the learned query's attention weights over the tokens, averaged over the heads."""
        return self._attend(tokens)[2].mean(dim=1)

    def location_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, embed_dim)``: each location's embedding, ``proj(T * share_t)``; their mean over the
        locations is ``forward(tokens)`` (the module doc)."""
        x, n, a = self._attend(tokens)
        b, t, d = x.shape
        v = self.value(n).reshape(b, t, self.heads, d // self.heads)
        weighted = (a.permute(0, 2, 1)[..., None] * v).reshape(b, t, d)  # a_{h,t} v_{h,t}, heads side by side
        share = x / t + self.gamma * (F.linear(weighted, self.out.weight) + self.out.bias / t)
        return self.proj(t * share)


def attention_head(config, tower) -> AttentionPoolHead:
    """The attention image head of ``config`` over ``tower``'s tokens."""
    return AttentionPoolHead(token_dim(tower), config.embed_dim, config.image_head_blocks)
