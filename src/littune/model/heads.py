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

**The grid.** A head trained from a token cache reads that cache's grid (``littune embed --tokens GRID``
average-pools a larger map): the model records it (``image_token_grid`` in config.json, :func:`token_grid`)
and pools the tower's map to it with the cache's own pooling (:func:`littune.cache.tokens.pool_map`) wherever
it runs the tower (``encode_image``, its ONNX graph, heat maps); a cache of another grid is refused in one line.
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


def tower_tokens(tower, pixels: torch.Tensor, grid=None) -> torch.Tensor:
    """``(B, h*w, F)``: the tower's map for ``pixels``, row by row (one forward pass; a tower without a map
    in torch is one :class:`LittuneError` naming it), average-pooled to ``grid`` as a token cache pools it
    (:func:`littune.cache.tokens.pool_map`; None: the map as it is)."""
    from ..cache.tokens import pool_map
    from ..towers.spatial import spatial_features

    fmap = spatial_features(tower, pixels).features
    fmap = fmap if grid is None else pool_map(fmap, grid)
    return fmap.reshape(fmap.shape[0], -1, fmap.shape[-1])


def token_grid(tower) -> tuple[int, int] | None:
    """The grid ``(h, w)`` the attention head was trained on (the training token cache's, ``image_token_grid``
    in config.json), or None: the tower's own map (a model trained on the fly, or saved before the grid was)."""
    found = getattr(tower, "token_grid", None)
    if found is None:
        return None
    if not (isinstance(found, (list, tuple)) and len(found) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in found)):
        raise LittuneError(f"the attention image head's token grid must be two positive integers [h, w], not "
                           f"{found!r} (image_token_grid in the model's config.json)")
    return int(found[0]), int(found[1])


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


def token_request(model):
    """The ``tokens`` request (``embed_source``, ``find_reused``) whose tokens the model's image head reads:
    None (pooled features), True (the tower's own map) or the largest side of the grid it was trained on
    (a cache pools ``--tokens GRID`` to at most ``GRID x GRID``: the same grid)."""
    if not reads_tokens(model):
        return None
    return max(model.image_head.grid) if model.image_head.grid else True


def runner_spatial(model):
    """What a locked tower's runner must also give for the model's image head: None, or the map (the attention
    head: :func:`littune.cache.tokens.pooled_and_map`, as ``littune embed --tokens`` computes it)."""
    from ..cache.tokens import pooled_and_map

    return pooled_and_map if reads_tokens(model) else None


def runner_rows(model, out):
    """The image head's input from a locked tower's runner (opened with ``spatial=pooled_and_map`` for the
    attention head, :func:`token_request`): its pooled features, or its map's tokens pooled to the head's
    grid as a token cache stores them (:func:`littune.cache.tokens.to_grid`)."""
    if not reads_tokens(model):
        return out
    from ..cache.tokens import to_grid

    return to_grid(out[1], model.image_head.grid or tuple(out[1].shape[1:3]))


def head_input(model):
    """What the model's image head reads from a cache: False (pooled features), or the token grid it was
    trained on (``(h, w)``; True: the tower's own map)."""
    return (model.image_head.grid or True) if reads_tokens(model) else False


def cache_rows(cache, rows, tokens):
    """A batch's image inputs from an embedding cache: its tokens ``(n, T, F)`` (``tokens``: the attention
    head, see :func:`head_input`) or its pooled features ``(n, F)``; a cache without tokens, or with
    another grid, is refused for the attention head (one line)."""
    if not tokens:
        return cache.features(rows)
    check_token_cache(cache, tokens)
    return cache.tokens(rows)


def check_token_cache(cache, grid=None, where: str = "") -> None:
    """``cache`` holds tokens, of ``grid`` (``(h, w)``; True: the tower's own map, not pooled; None: any); else
    one :class:`LittuneError` (``where``: what named the cache, e.g. ``val.retrieval[0]``)."""
    at = f"{where}: " if where else ""
    if not getattr(cache, "has_tokens", False):
        raise LittuneError(at + TOKEN_CACHE_NEEDED.format(where=getattr(cache, "directory", "")))
    if grid is None:
        return
    (h, w), pool = cache.token_grid, cache.manifest["tokens"].get("pool", "none")
    if (tuple(grid) != (h, w)) if grid is not True else pool != "none":
        want = "the tower's own map" if grid is True else f"{grid[0]} x {grid[1]} tokens"
        raise LittuneError(f"{at}the cache {cache.directory} holds {h} x {w} tokens"
                           f"{', average-pooled' if pool != 'none' else ''}; the attention image head reads {want} "
                           f"(the grid it was trained on): littune embed SOURCE --out CACHE --tokens "
                           f"{'' if grid is True else grid[0]} stores them")


def train_tokens(config, tower, cache, val):
    """``tower``, given the attention head's input from the training cache ``cache``: its tokens' width and
    grid (the model records the grid and pools the tower's map to it); every validation cache (``val``) must
    hold the same grid (one line naming it otherwise)."""
    from ..cache import EmbeddingCache

    tower.token_dim = getattr(cache, "token_dim", None)
    if config.image_head != "attention" or not getattr(cache, "has_tokens", False):
        return tower
    tower.token_grid = cache.token_grid
    for kind in ("zeroshot", "retrieval"):
        for k, item in enumerate(getattr(val, kind)):
            # the grid is in the manifest: no checksums here (validation verifies each cache when it reads it)
            check_token_cache(EmbeddingCache.open(item["cache"], verify=False), cache.token_grid, f"val.{kind}[{k}]")
    return tower


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
        self.grid: tuple[int, int] | None = None  # the token grid trained on (None: the tower's own map)

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
    head = AttentionPoolHead(token_dim(tower), config.embed_dim, config.image_head_blocks)
    head.grid = token_grid(tower)
    return head
