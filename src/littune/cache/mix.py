"""Rows of several sources trained on as one: the cache's images beside extra rows (e.g. anchors).

:class:`MixedRows` lists the chosen rows of each source one after the other, each source's rows
``repeat`` times, and reads like an :class:`~littune.cache.EmbeddingCache` (``len``, ``features``,
``sample_captions``, ``trainable``, ``key``), so :class:`~littune.train.batches.CacheBatches` samples
from it as from one cache: position ``p`` of the mix is one row of one source. A source is anything
with ``features(idx, view=)`` and ``sample_captions(idx, choice, language_share)``; augmented views (``views``) are
those of the first source, and a source without views gets its single feature for every view.
"""

from __future__ import annotations

import numpy as np


class MixedRows:
    """``parts``: ``[(source, rows or None for all of them, repeat), ...]``; the first is the cache."""

    def __init__(self, parts: list[tuple]):
        self.sources, self.rows, ends = [], [], []
        total = 0
        for source, rows, repeat in parts:
            rows = np.arange(len(source), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
            self.sources.append(source)
            self.rows.append(rows)
            total += len(rows) * int(repeat)
            ends.append(total)
        self._ends = np.asarray(ends, dtype=np.int64)
        self._starts = np.concatenate([[0], self._ends[:-1]])
        first = self.sources[0]
        self.views = int(getattr(first, "views", 0))
        self.directory = getattr(first, "directory", None)
        self.dim = first.dim

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """The source and the source's row of each position of the mix."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self._ends, pos, side="right")
        row = np.empty_like(pos)
        for j in np.unique(part).tolist():
            here = part == j
            row[here] = self.rows[j][(pos[here] - self._starts[j]) % len(self.rows[j])]
        return part, row

    def features(self, positions, view=None) -> np.ndarray:
        part, row = self.locate(positions)
        out = np.empty((len(row), self.dim), dtype=np.float32)
        for j in np.unique(part).tolist():
            here = part == j
            v = None
            if view is not None and getattr(self.sources[j], "views", 0):
                v = np.broadcast_to(np.asarray(view, dtype=np.int64), row.shape)[here]
            out[here] = self.sources[j].features(row[here], view=v)
        return out

    def sample_captions(self, positions, choice, language_share: dict | None = None) -> list[str]:
        """One caption per position, each drawn by its source (``language_share`` is passed on)."""
        part, row = self.locate(positions)
        choice = np.asarray(choice, dtype=np.int64).reshape(-1)
        out: list[str] = [""] * len(row)
        for j in np.unique(part).tolist():
            here = np.flatnonzero(part == j)
            for k, text in zip(here.tolist(), self.sources[j].sample_captions(row[here], choice[here], language_share)):
                out[k] = text
        return out

    def trainable(self) -> np.ndarray:
        """Every position: each source contributes only the rows it was given."""
        return np.arange(len(self), dtype=np.int64)

    def key(self, i: int) -> str:
        part, row = self.locate([i])
        return self.sources[int(part[0])].key(int(row[0]))
