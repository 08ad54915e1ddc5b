"""Is a cache stale for what the configuration asks? Its tower and source fingerprints, and the rule they were made by.

A cache is stale when its tower fingerprint or its source fingerprint is not the configuration's, and,
for an ``hf:`` or ``torch:`` tower, when it was made under fingerprint scheme 1
(:data:`~littune.cache.format.FINGERPRINT_SCHEME`): that rule left the pooling (and a torch factory's
arguments) out of the fingerprint, so ``hf:DIR#cls`` and ``hf:DIR#mean`` caches could not be told apart.
Such a cache is reported once, saying why; re-embedding makes a scheme 2 cache.
"""

from __future__ import annotations

import sys

from ..errors import StaleCacheError
from .format import FINGERPRINT_SCHEME

#: why a fingerprint made under scheme 1 is not trusted (see :func:`old_fingerprint_rule`)
OLD_RULE = ("under the old fingerprint rule, which left the pooling (and a torch: factory's arguments) out of hf: "
            "and torch: tower fingerprints, so it may hold another pooling's features")


def old_fingerprint_rule(fingerprint: str | None, scheme: int | None = None) -> bool:
    """Was ``fingerprint`` made under scheme 1, which left an ``hf:`` or ``torch:`` tower's pooling out?

    ``scheme``: the one a cache's manifest or plan records (1 when it records none); None: tell from the
    fingerprint itself (a model directory records no scheme; scheme 2 names hold a ``#``)."""
    if not str(fingerprint or "").startswith(("hf:", "torch:")):
        return False
    if scheme is not None:
        return scheme < FINGERPRINT_SCHEME
    return "#" not in str(fingerprint).split("|", 1)[0]


def check_cache(cache, tower_fingerprint: str | None, source_fingerprint: str | None,
                allow_stale: bool | None) -> bool:
    """:meth:`~littune.cache.reader.EmbeddingCache.check`: a one-line :class:`StaleCacheError` naming both
    fingerprints (or, ``allow_stale``, the same line on stderr as a warning, and True: stale, used anyway)."""
    problems = []
    if tower_fingerprint is not None:
        problems += _tower_problems(cache, tower_fingerprint)
    if source_fingerprint is not None and source_fingerprint != cache.source_fingerprint:
        problems.append(f"source fingerprint: configuration {source_fingerprint}, cache {cache.source_fingerprint}")
    if not problems:
        return False
    message = (f"embedding cache {cache.directory} is stale ({'; '.join(problems)}): it was built from "
               f"{cache.manifest.get('source')} with {cache.manifest.get('tower_name')}")
    if allow_stale:
        print(f"littune: warning: {message}; used anyway (--allow-stale-cache)", file=sys.stderr)
        return True
    raise StaleCacheError(f"{message}; re-run `littune embed` with the configured tower and source, or point the "
                          "configuration at the matching cache"
                          + (" (--allow-stale-cache uses it anyway)" if allow_stale is False else ""))


def _tower_problems(cache, expected: str) -> list[str]:
    found = cache.tower_fingerprint
    problems = [f"image tower fingerprint: configuration {expected}, cache {found}"] if expected != found else []
    if old_fingerprint_rule(found, cache.manifest.get("fingerprint_scheme", 1)):
        problems.append(f"the cache was made {OLD_RULE}")
    elif expected != found and old_fingerprint_rule(expected):
        problems.append("the configuration's fingerprint (a model saved by an earlier littune) was made "
                        + OLD_RULE.replace("may hold", "may have been trained on"))
    return problems
