"""``data.caption_budget``: at most so many captions of each image take part in training.

An emoji of the main job has about 50 captions in 28 languages. A text tower trained every step reads
whichever the step draws, at no extra cost; a *locked* text tower whose caption features are computed
once (:mod:`littune.cache.text`) pays for every caption that can be drawn, before the first step. The
budget bounds that: ``{"en": 2, "*": 2}`` keeps at most 2 English captions of each image and at most 2
of all its other languages together (``"*"``; an unknown language counts there). A language the budget
does not name, with no ``"*"``, keeps all its captions.

Which captions an image keeps is a pure function of (seed, image row): a seeded draw within each
budgeted group, so a run, its resume and its text cache agree on them. Training then draws among the
kept captions exactly as it draws among all of them (``data.language_share``). With no budget the
cache is used as it is and the batches are unchanged.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from ..errors import ConfigError
from ..train.sampling import pick_caption

#: the key for every language the budget does not name
OTHERS = "*"


def check_budget(budget: Mapping | None) -> dict[str, int]:
    """``data.caption_budget`` checked: language codes (or ``*``) to whole numbers >= 0."""
    if not budget:
        return {}
    if not isinstance(budget, Mapping):
        raise ConfigError(f"data.caption_budget must map languages to caption counts, e.g. "
                          f"{{\"en\": 2, \"*\": 2}}; got {budget!r}")
    out = {}
    for lang, n in budget.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"data.caption_budget[{lang!r}] = {n!r}: a caption count must be a whole number >= 0")
        out[str(lang)] = n
    if not any(out.values()):
        raise ConfigError("data.caption_budget keeps no caption at all: give at least one language a count above 0")
    return out


class CaptionBudget:
    """An :class:`~littune.cache.EmbeddingCache` whose images keep only their budgeted captions.

    Reads like the cache (every attribute is the cache's) except :meth:`sample_captions`, which draws
    among the kept captions, and :meth:`trainable`, which leaves out images that keep none."""

    def __init__(self, cache, budget: Mapping[str, int], seed: int):
        self.cache, self.budget, self.seed = cache, check_budget(budget), int(seed)
        self._kept: dict[int, tuple[list[str], list[str]]] = {}

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def __len__(self) -> int:
        return len(self.cache)

    def kept(self, i: int) -> tuple[list[str], list[str]]:
        """Image ``i``'s kept captions and their languages, in the cache's order."""
        i = int(i)
        if i not in self._kept:
            captions, langs = self.cache.captions(i), self.cache.caption_languages(i)
            keep = self._choose(langs, i)
            self._kept[i] = ([captions[k] for k in keep], [langs[k] for k in keep])
        return self._kept[i]

    def _choose(self, langs: list[str], i: int) -> list[int]:
        groups: dict[str, list[int]] = {}
        for k, lang in enumerate(langs):
            key = lang if lang in self.budget else OTHERS
            groups.setdefault(key, []).append(k)
        rng = np.random.default_rng([self.seed, i, 104729])
        keep = []
        for key in sorted(groups):
            pos, n = groups[key], self.budget.get(key)
            if n is None or len(pos) <= n:
                keep.extend(pos)
            else:
                keep.extend(pos[j] for j in rng.permutation(len(pos))[:n].tolist())
        return sorted(keep)

    def sample_captions(self, indices, choice, language_share: dict | None = None) -> list[str]:
        """As :meth:`EmbeddingCache.sample_captions`, among each image's kept captions."""
        out = []
        share = language_share if self.cache.languages else None
        for i, r in zip(np.asarray(indices, dtype=np.int64).tolist(), np.asarray(choice, dtype=np.int64).tolist()):
            texts, langs = self.kept(i)
            if not texts:
                out.append("")
                continue
            out.append(texts[pick_caption(langs, r, share) if share else r % len(texts)])
        return out

    def trainable(self) -> np.ndarray:
        rows = self.cache.trainable()
        return np.asarray([i for i in rows.tolist() if self.kept(i)[0]], dtype=np.int64)

    def texts(self, rows) -> Iterator[str]:
        """Every kept caption of ``rows`` (what a locked text tower's cache must hold)."""
        for i in np.asarray(rows, dtype=np.int64).tolist():
            yield from self.kept(i)[0]
