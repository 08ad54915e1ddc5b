"""The locked tower's own labels as text: each classifier row becomes an extra training "image".

A supervised tower was trained to separate its classes with a linear head over the very features
littune caches. Row ``c`` of that head points where the tower puts class ``c``; placed as a feature
vector, it becomes one more training row whose captions are the class's names and synonyms
(``data.anchors``). The text tower then also learns "tabby cat", "frog" and "sports car" at the
places the image tower itself assigns them, from names the training captions may never use.

Where a row is placed (``placement``), from ``mu`` the mean training feature, ``s`` the median
distance of the training features to it and ``u_c`` the unit vector of row ``c``:

* ``row`` -- ``mu + s * u_c``: one typical step from the mean along the row;
* ``confident`` -- ``mu + t_c * u_c`` with the smallest ``t_c`` at which the head gives class ``c``
  probability ``CONFIDENT`` (bisection on ``t_c``): every anchor is equally sure, not equally far;
* ``class-mean`` -- the mean of the training features the head itself puts in class ``c`` when there
  are at least ``MIN_ROWS`` of them (an anchor inside the training domain), else ``row``.

Every placement is clipped at 0 where the training features are all non-negative (pooled ReLU
features, EfficientNet's), and read only from the cache and the head's weights file: the image tower
is never built. The rows are deterministic (no random numbers), so every rank and every resumed run
places them alike.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, LittuneError

PLACEMENTS = ("row", "confident", "class-mean")
DEFAULT = {"repeat": 1, "placement": "row"}
CONFIDENT = 0.5  # the head's probability of its own class at a ``confident`` anchor
MIN_ROWS = 5  # training rows the head must give a class for ``class-mean`` to use their mean
SAMPLE = 50_000  # training features read for the placement, evenly spaced over the rows


def check_anchors(value) -> dict | None:
    """``data.anchors``: None (off) or ``{repeat: N >= 1, placement: row|confident|class-mean}``, with
    defaults filled in; a one-line :class:`ConfigError` naming the key otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"data.anchors: expected a mapping like {{repeat: 2, placement: row}}, got {value!r}")
    for key in value:
        if key not in DEFAULT:
            raise ConfigError(f"data.anchors.{key}: unknown key; use {', '.join(DEFAULT)}")
    spec = {**DEFAULT, **value}
    repeat = spec["repeat"]
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ConfigError(f"data.anchors.repeat: expected an integer >= 1, got {repeat!r}")
    if spec["placement"] not in PLACEMENTS:
        raise ConfigError(f"data.anchors.placement: {spec['placement']!r} is not one of {', '.join(PLACEMENTS)}")
    return spec


# -- placement ---------------------------------------------------------------------------------------
def _frame(features: np.ndarray, weight: np.ndarray):
    """``mu``, ``s``, the rows' unit vectors and the clipping floor (0, or None: no clipping)."""
    x = np.asarray(features, dtype=np.float64)
    mu = x.mean(0)
    s = float(np.median(np.linalg.norm(x - mu, axis=1)))
    w = np.asarray(weight, dtype=np.float64)
    units = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    floor = 0.0 if x.min() >= 0 else None
    return mu, s, units, floor


def _clip(a: np.ndarray, floor) -> np.ndarray:
    return a if floor is None else np.maximum(a, floor)


def _own_probability(head, anchors: np.ndarray) -> np.ndarray:
    """The head's softmax probability of class ``c`` at anchor ``c``, for every ``c``."""
    logits = anchors @ np.asarray(head.weight, dtype=np.float64).T + np.asarray(head.bias, dtype=np.float64)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return np.diagonal(p) / p.sum(1)


def place_row(head, features: np.ndarray) -> np.ndarray:
    mu, s, units, floor = _frame(features, head.weight)
    return _clip(mu + s * units, floor)


def place_confident(head, features: np.ndarray, target: float = CONFIDENT, steps: int = 24) -> np.ndarray:
    """The smallest step ``t_c`` along each row (up to 64 ``s``) at which the head is ``target`` sure."""
    mu, s, units, floor = _frame(features, head.weight)
    lo, hi = np.zeros(len(units)), np.full(len(units), 64.0 * s)
    for _ in range(steps):  # bisection, all classes at once
        mid = (lo + hi) / 2
        sure = _own_probability(head, _clip(mu + mid[:, None] * units, floor)) >= target
        hi, lo = np.where(sure, mid, hi), np.where(sure, lo, mid)
    return _clip(mu + hi[:, None] * units, floor)


def place_class_mean(head, features: np.ndarray, min_rows: int = MIN_ROWS) -> np.ndarray:
    out = place_row(head, features)
    assigned = np.argmax(head.logits(features), axis=1)
    counts = np.bincount(assigned, minlength=len(out))
    sums = np.zeros_like(out)
    np.add.at(sums, assigned, np.asarray(features, dtype=np.float64))
    enough = counts >= min_rows
    out[enough] = sums[enough] / counts[enough, None]
    return out


def place(head, features: np.ndarray, placement: str) -> np.ndarray:
    """``(classes, dim)`` float32 anchor features for ``head`` from training ``features``."""
    fn = {"row": place_row, "confident": place_confident, "class-mean": place_class_mean}[placement]
    return fn(head, features).astype(np.float32)


def recovered(head, anchors: np.ndarray) -> float:
    """Fraction of the classes whose anchor the head assigns to that class."""
    return float(np.mean(np.argmax(head.logits(anchors), axis=1) == np.arange(len(anchors))))


def training_sample(cache, rows: np.ndarray | None, limit: int = SAMPLE) -> np.ndarray:
    """Eval-view features of at most ``limit`` training rows, evenly spaced (deterministic)."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows)
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]
    return cache.features(rows)


# -- the rows training mixes in ----------------------------------------------------------------------
class AnchorRows:
    """The anchors as a source of training rows (the interface :mod:`littune.cache.mix` mixes):
    ``features``, ``sample_captions``, ``trainable``, ``key``, ``captions`` like an
    :class:`~littune.cache.EmbeddingCache`. ``repeat``: how many times the mix lists each row."""

    views = 0

    def __init__(self, features: np.ndarray, names: list[list[str]], tower: str, placement: str, repeat: int = 1):
        if len(features) != len(names):
            raise LittuneError(f"data.anchors: {tower} has {len(features)} classifier rows but {len(names)} "
                               "class names")
        self._features = np.ascontiguousarray(features, dtype=np.float32)
        self.names, self.tower, self.placement, self.repeat = names, tower, placement, int(repeat)
        self.dim = self._features.shape[1]

    def __len__(self) -> int:
        return len(self._features)

    def features(self, indices, view=None) -> np.ndarray:
        return self._features[np.asarray(indices, dtype=np.int64)]

    def captions(self, i: int) -> list[str]:
        return list(self.names[int(i)])

    def sample_captions(self, indices, choice, language_share=None) -> list[str]:
        """Name ``choice[k] % count`` of class ``indices[k]`` (a class's names and synonyms, all English:
        uniformly, whatever ``language_share`` says)."""
        return [self.names[i][r % len(self.names[i])] for i, r in
                zip(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(choice, dtype=np.int64).tolist())]

    def iter_captions(self):
        for names in self.names:
            yield from names

    def trainable(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def key(self, i: int) -> str:
        return f"anchor:{self.tower}:{int(i)}"


def cache_head(cache):
    """The classifier head of the tower that made ``cache`` (a one-line error if it has none, or if
    the head does not read the cache's features)."""
    from ..towers.heads import read_head

    head = read_head(cache.manifest.get("tower_spec") or cache.manifest.get("tower_name"))
    if head.weight.shape[1] != cache.dim:
        raise LittuneError(f"data.anchors: the head of {head.tower} reads {head.weight.shape[1]}-d features, the "
                           f"cache {cache.directory} holds {cache.dim}-d ones (a different pooling or output?)")
    return head


def build_anchors(cache, spec: dict, head=None, exclude=None) -> AnchorRows:
    """The anchor rows of ``head`` (default: the head of the tower that made ``cache``), placed among
    the training rows of ``cache``: its captioned rows less those the ``exclude`` list names."""
    head = cache_head(cache) if head is None else head
    rows = cache.trainable()
    if exclude is not None:
        from .dedup import excluded_rows

        rows = np.setdiff1d(rows, excluded_rows(cache, exclude))
    feats = place(head, training_sample(cache, rows), spec["placement"])
    return AnchorRows(feats, head.names, head.tower, spec["placement"], spec["repeat"])


def anchor_rows(cache, options: dict, head, exclude, say) -> "AnchorRows":
    """The training run's anchor rows (``data.anchors``), built and described in one line to ``say``."""
    rows = build_anchors(cache, options, head, exclude)
    say(f"anchors: {len(rows):,} classes of {rows.tower} placed by {rows.placement!r}, each "
             f"{rows.repeat}x an epoch; the head gives {recovered(head, rows.features(rows.trainable())):.1%} "
             "of them their own class")
    return rows
