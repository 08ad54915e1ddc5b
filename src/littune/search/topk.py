"""Exact top-k search: brute force over the database, chunk by chunk, in bounded memory.

The database is scanned in chunks of 8192 rows (float16 converted to float32 into a reused buffer
that stays in cache for the matmul), ``scores = queries @ chunk.T``, and the chunk's top k is kept
(``torch.topk``); one last ``topk`` over the kept candidates gives the answer. Memory stays at one
chunk whatever the collection size. For a batch of 100 queries over 1M x 512 it takes 0.85-1.1x the
time of one bare ``torch.topk(q @ db.T)`` over a float32 copy of the database
(``benchmarks/search_speed.py``); a single query is bound by the float16 conversion (about 1.8x the
bare float32 matrix-vector product). Results are sorted by descending score, equal scores by
ascending index; which of several items tied exactly at the k-th score makes the cut is not specified.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import LittuneError

DEFAULT_CHUNK_ROWS = 8192  # 16 MB of float32 per chunk at 512-d: stays in cache between conversion and matmul


def query_tensor(queries) -> torch.Tensor:
    """Queries (a tensor or array, ``(Q, D)`` or ``(D,)``) as a contiguous float32 ``(Q, D)`` CPU tensor."""
    q = queries.detach() if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    q = q.float().cpu()
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise LittuneError(f"queries must be (n, dim), got shape {tuple(q.shape)}")
    return q.contiguous()


def _rows(database, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a numpy array / memmap or tensor, as a tensor (no copy when possible)."""
    if isinstance(database, torch.Tensor):
        return database[start:stop]
    block = database[start:stop]
    with warnings.catch_warnings():  # read-only memory maps: we never write through the tensor
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(block))


def _check_shapes(q: torch.Tensor, database, k: int) -> tuple[int, int]:
    if getattr(database, "ndim", 0) != 2:
        raise LittuneError(f"the database must be (n, dim), got shape {tuple(getattr(database, 'shape', ()))}")
    n, d = int(database.shape[0]), int(database.shape[1])
    if q.shape[1] != d:
        raise LittuneError(f"queries are {q.shape[1]}-d but the index holds {d}-d embeddings")
    if k < 1:
        raise LittuneError(f"k must be at least 1, not {k}")
    return n, d


def topk_search(queries, database, k: int = 10, chunk_rows: int = DEFAULT_CHUNK_ROWS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product search: ``(scores (Q, k) float32, indices (Q, k) int64)``.

    ``database`` is an ``(N, D)`` numpy array (a memory map is fine), or a CPU tensor, float16 or
    float32; ``queries`` is ``(Q, D)`` (or ``(D,)``). ``k`` is capped at ``N``. Rows are sorted
    by descending score, ties by ascending index.
    """
    q = query_tensor(queries)
    n, d = _check_shapes(q, database, k)
    k = min(int(k), n)
    nq = q.shape[0]
    if n == 0 or nq == 0:
        return torch.empty(nq, k), torch.empty(nq, k, dtype=torch.int64)
    chunk_rows = max(int(chunk_rows), 4 * k)  # keeps the candidates (chunks x k) a fraction of the rows
    needs_cast = database.dtype not in (np.float32, torch.float32)
    buf = torch.empty(min(chunk_rows, n), d, dtype=torch.float32) if needs_cast else None
    scores = torch.empty(nq, min(chunk_rows, n), dtype=torch.float32)
    vals, idxs = [], []
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        m = stop - start
        rows = _rows(database, start, stop)
        if needs_cast:
            block = buf[:m]
            block.copy_(rows)
        else:
            block = rows
        s = scores[:, :m]
        torch.mm(q, block.T, out=s)
        v, i = torch.topk(s, min(k, m), dim=1, sorted=False)
        vals.append(v)
        idxs.append(i + start)
    # One merge at the end: (Q, chunks * k) candidates hold the exact top k.
    v, i = (vals[0], idxs[0]) if len(vals) == 1 else (torch.cat(vals, dim=1), torch.cat(idxs, dim=1))
    best_v, pos = torch.topk(v, k, dim=1, sorted=False)
    best_i = i.gather(1, pos)
    return _sort_hits(best_v, best_i)


def _sort_hits(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by descending score, ascending index among equal scores."""
    order = torch.argsort(i, dim=1)  # by index first, then a stable sort by score
    v, i = v.gather(1, order), i.gather(1, order)
    order = torch.argsort(-v, dim=1, stable=True)
    return v.gather(1, order).contiguous(), i.gather(1, order).contiguous()
