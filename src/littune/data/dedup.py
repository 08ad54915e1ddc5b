"""Near-duplicates of evaluation images removed from training, as the paper does for its evaluation sets.

A training image is a near duplicate when the cosine similarity of its locked-tower features to some
evaluation image's is at least a threshold. Features are the eval view (view 0) of each embedding
cache, L2-normalised and not centred: plain cosine. The caches must come from the same tower (the
same fingerprint), or the features would not be comparable.

:func:`near_duplicates` reads the training cache chunk by chunk (``EmbeddingCache.features`` over a
range of rows) and searches each chunk against all evaluation rows, held in memory as one float32
matrix, with the exact search of :mod:`littune.search.topk` (``k=1``: the best evaluation image and
its cosine). Memory stays at one training chunk, the evaluation matrix and one chunk of scores,
whatever the training cache's size. The best match of a row does not depend on the chunk size;
its cosine agrees to float32 rounding.

:func:`write_list` writes what was found as a TSV (a header, then one row per duplicate: train row,
train key, cosine, evaluation cache, evaluation key), atomically. ``data.exclude`` in a training
configuration names such a list: :func:`excluded_rows` matches it to a cache by key (not by row
index, so the list survives a re-embedded cache whose rows moved) and the trainer never samples
those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import LittuneError
from ..fileio import atomic_write
from ..search.topk import topk_search

HEADER = ("train_row", "train_key", "cosine", "eval_cache", "eval_key")
DEFAULT_CHUNK_ROWS = 2048  # training rows per search: 2048 x 8192 float32 scores = 64 MB at most


@dataclass(frozen=True)
class Duplicate:
    """One training image and the evaluation image it nearly duplicates."""

    train_row: int
    train_key: str
    cosine: float
    eval_cache: str
    eval_key: str


def _unit(x: np.ndarray) -> torch.Tensor:
    """Rows as float32 unit vectors (an all-zero row stays zero: cosine 0 with everything)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def check_same_tower(train, evals: Sequence) -> None:
    """A one-line error unless every evaluation cache has the training cache's tower fingerprint."""
    for ev in evals:
        if ev.tower_fingerprint != train.tower_fingerprint or ev.dim != train.dim:
            raise LittuneError(f"caches from different image towers: {train.directory} has "
                               f"{train.tower_fingerprint} ({train.dim}-d), {ev.directory} has "
                               f"{ev.tower_fingerprint} ({ev.dim}-d); embed both with the same tower")


def _eval_matrix(evals: Sequence) -> tuple[torch.Tensor, np.ndarray]:
    """All evaluation rows as one unit-norm matrix, and the start row of each cache in it."""
    blocks = [_unit(ev.features(range(len(ev)))) for ev in evals]
    starts = np.cumsum([0] + [len(b) for b in blocks])
    return torch.cat(blocks) if blocks else torch.empty(0, 0), starts


def near_duplicates(train, evals: Sequence, threshold: float, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    progress: bool = False) -> list[Duplicate]:
    """Training images of ``train`` (an :class:`~littune.cache.EmbeddingCache`) whose cosine to some image of
    ``evals`` (caches of the same tower) is ``>= threshold``, in training-row order, each with its best match
    (on an exact tie, the first evaluation row in the order given)."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise LittuneError(f"threshold must be a cosine between -1 and 1, not {threshold}")
    if chunk_rows < 1:
        raise LittuneError(f"chunk_rows must be >= 1, not {chunk_rows}")
    evals = list(evals)
    if not evals:
        raise LittuneError("give at least one evaluation cache to compare against")
    check_same_tower(train, evals)
    db, starts = _eval_matrix(evals)
    found: list[Duplicate] = []
    if not len(db):
        return found
    from tqdm.auto import tqdm

    bar = tqdm(total=len(train), unit="img", desc="dedup", disable=not progress)
    for lo in range(0, len(train), chunk_rows):
        hi = min(lo + chunk_rows, len(train))
        scores, idx = topk_search(_unit(train.features(range(lo, hi))), db, k=1)
        for r in torch.nonzero(scores[:, 0] >= threshold).flatten().tolist():
            e = int(idx[r, 0])
            c = int(np.searchsorted(starts, e, side="right")) - 1
            found.append(Duplicate(lo + r, train.key(lo + r), float(scores[r, 0]), str(evals[c].directory),
                                   evals[c].key(e - int(starts[c]))))
        bar.update(hi - lo)
    bar.close()
    return found


def _field(text: str, what: str) -> str:
    if "\t" in text or "\n" in text or "\r" in text:
        raise LittuneError(f"{what} {text!r} holds a tab or a line break: it cannot go in a TSV list")
    return text


def write_list(path: str | Path, found: Sequence[Duplicate]) -> Path:
    """The duplicates as a TSV with a header line (:data:`HEADER`), written atomically."""
    lines = ["\t".join(HEADER)]
    for d in found:
        lines.append("\t".join([str(d.train_row), _field(d.train_key, "training key"), f"{d.cosine:.6f}",
                                _field(d.eval_cache, "cache path"), _field(d.eval_key, "evaluation key")]))
    return atomic_write(path, "\n".join(lines) + "\n")


def read_keys(path: str | Path) -> list[str]:
    """The training keys of a list written by :func:`write_list` (an empty list is fine)."""
    p = Path(path)
    if not p.is_file():
        raise LittuneError(f"data.exclude: {p} does not exist (write it with `littune dedup`)")
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines or tuple(lines[0].split("\t")[:2]) != HEADER[:2]:
        raise LittuneError(f"data.exclude: {p} is not a `littune dedup` list (its first line must be "
                           f"{chr(9).join(HEADER)!r})")
    rows = [ln.split("\t") for ln in lines[1:] if ln]
    bad = next((i for i, r in enumerate(rows, 2) if len(r) < 2), None)
    if bad is not None:
        raise LittuneError(f"data.exclude: {p} line {bad} has no training key")
    return [r[1] for r in rows]


def excluded_rows(cache, path: str | Path, chunk: int = 65536) -> np.ndarray:
    """Sorted row indices of ``cache`` whose key is in the list at ``path``; a one-line error when some
    key of the list is not in the cache (the list was made for another cache)."""
    wanted = set(read_keys(path))
    rows, seen = [], set()
    n = len(cache)
    for lo in range(0, n, chunk) if wanted else ():
        for i, key in enumerate(cache._keys.range(lo, min(n, lo + chunk)), lo):
            if key in wanted:
                rows.append(i)
                seen.add(key)
    missing = wanted - seen
    if missing:
        raise LittuneError(f"data.exclude: {len(missing)} of the {len(wanted)} keys in {path} are not in the cache "
                           f"{cache.directory} (e.g. {sorted(missing)[0]!r}): the list was made for another cache")
    return np.asarray(rows, dtype=np.int64)
