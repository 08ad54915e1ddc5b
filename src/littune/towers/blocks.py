"""The pre-LN transformer block of the text transformer (:class:`littune.towers.text.TextTransformer`):
``x + MHA(LN(x))``, then ``x + MLP(LN(x))``, in three layouts of the same computation:

* :meth:`Block.forward`: a padded batch (B, N, W), padding masked out of attention;
* :meth:`Block.forward_at`: the same, output at one token per row (the pooled token of the final block);
* :meth:`Block.forward_packed` / :meth:`Block.forward_packed_at`: packed tokens (T, W), the real tokens
  of rows sorted by length: the linear layers and norms run once over all of them and each run of
  equal-length rows attends as one dense batch, so nothing is computed on padding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self._attend_and_mlp(x, q, k, v, key_mask)

    def forward_at(self, x: torch.Tensor, key_mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """``forward(x, key_mask)[arange(B), at]``, the block's output at one token per row, at a
        fraction of the cost: every token still gives its key and value, but only the token ``at``
        asks the query and goes through the projection and the MLP (the rows do not mix there)."""
        b, n, w = x.shape
        h = self.ln1(x)
        kv = F.linear(h, self.qkv.weight[w:], self.qkv.bias[w:]).view(b, n, 2, self.heads, w // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        rows = torch.arange(b, device=x.device)
        q = F.linear(h[rows, at], self.qkv.weight[:w], self.qkv.bias[:w]).view(b, 1, self.heads, w // self.heads)
        return self._attend_and_mlp(x[rows, at].unsqueeze(1), q.transpose(1, 2), k, v, key_mask).squeeze(1)

    def _attend_and_mlp(self, x, q, k, v, key_mask):
        """``x`` (B, m, W) plus attention of its queries ``q`` over the keys, then plus the MLP."""
        b, m, w = x.shape
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=p)
        return self._proj_and_mlp(x, a.transpose(1, 2).reshape(b, m, w))

    def _proj_and_mlp(self, x, a):
        p = self.dropout if self.training else 0.0
        x = x + F.dropout(self.proj(a), p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), p, self.training)

    # -- packed: the real tokens of rows sorted by length, no padding (TextTransformer._packed) ------
    def forward_packed(self, x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """The block over packed tokens ``x`` (T, W): ``runs`` is ``[(rows, length), ...]``, rows of one
        length stored one after another. The linear layers and norms see the T tokens at once; each
        run attends as one dense (rows, length) batch, so no token is padding and none is masked."""
        w = x.shape[1]
        qkv = self.qkv(self.ln1(x))
        return self._proj_and_mlp(x, self._attend_runs(qkv[:, :w], qkv[:, w:], runs, per_row=None))

    def forward_packed_at(self, x: torch.Tensor, runs: list[tuple[int, int]], at: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_packed` at one token per row (``at``: its index in ``x``), as :meth:`forward_at`."""
        w = x.shape[1]
        h = self.ln1(x)
        kv = F.linear(h, self.qkv.weight[w:], self.qkv.bias[w:])
        q = F.linear(h[at], self.qkv.weight[:w], self.qkv.bias[:w])
        return self._proj_and_mlp(x[at], self._attend_runs(q, kv, runs, per_row=1))

    def _attend_runs(self, q, kv, runs, per_row):
        """Attention run by run: ``q`` holds ``per_row`` queries a row (None: every token), ``kv`` every
        token's key and value; returns the heads' outputs in ``q``'s rows, (Tq, W)."""
        w, heads = q.shape[1], self.heads
        p = self.dropout if self.training else 0.0
        qs = torch.split(q, [c * (per_row or n) for c, n in runs])
        kvs = torch.split(kv, [c * n for c, n in runs])
        out = []
        for (c, n), qi, kvi in zip(runs, qs, kvs):
            m = per_row or n
            k, v = kvi.view(c, n, 2, heads, w // heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qi.view(c, m, heads, w // heads).transpose(1, 2), k, v, dropout_p=p)
            out.append(a.transpose(1, 2).reshape(c * m, w))
        return torch.cat(out)
