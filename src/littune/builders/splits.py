"""Splits that depend on nothing but each item's key and the seed.

Every split of the builders comes from a seeded hash of an item's key (:func:`stable_fraction`),
never from the order files are listed in. A threshold on the hash (Openclipart's train/val/test)
places each item by its own key alone; :func:`pick_fraction` (held-out concepts, ``val.csv``,
``--limit``) takes the keys with the smallest hashes, so adding or removing keys can move only
those nearest the cut.
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``(seed, key)``: the basis of every split."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_fraction(keys: Iterable[str], fraction: float, seed: int, salt: str = "") -> set[str]:
    """The ``round(fraction * n)`` keys with the smallest stable hash (at least 1 if fraction > 0)."""
    keys = sorted(set(keys))
    if fraction <= 0 or not keys:
        return set()
    n = min(len(keys), max(1, round(fraction * len(keys))))
    return set(sorted(keys, key=lambda k: stable_fraction(salt + k, seed))[:n])
