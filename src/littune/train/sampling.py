"""Which caption of an image a training step reads, when captions have languages.

The paper's multilingual recipe is no translation: one text tower reads every language against the
same locked image tower. With captions in 28 languages per image, sampling uniformly over captions
leaves English about one caption in thirteen, and a small text tower trained that way forgets it. The
rule here, ``data.language_share``, fixes each named language's share of an image's draws:

1. The languages of the image's captions are found (``""`` is the unknown language).
2. A named language the image has gets its share; the rest of the probability is split evenly among
   the image's other (unnamed) languages; an image with no unnamed language divides all of it among
   its named ones in proportion to their shares.
3. Within the chosen language, a caption is drawn uniformly.

With no share given, or for an image with captions in one language only, the draw is exactly the
plain uniform draw over all captions (``r % count``), so batches are bit-identical to training
without the option. ``r`` is the step's 62-bit random number for the image: bits 40-59 choose the
language, the number modulo the language's caption count chooses the caption.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import ConfigError

_LANG_BITS = 20


def check_share(share: Mapping[str, float] | None) -> dict[str, float]:
    """``data.language_share`` checked: language codes to shares in [0, 1] that sum to at most 1."""
    if not share:
        return {}
    if not isinstance(share, Mapping):
        raise ConfigError(f"data.language_share must map language codes to shares, e.g. {{\"en\": 0.5}}; got {share!r}")
    out = {}
    for lang, v in share.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
            raise ConfigError(f"data.language_share[{lang!r}] = {v!r}: a share must be a number in [0, 1]")
        out[str(lang)] = float(v)
    if sum(out.values()) > 1 + 1e-9:
        raise ConfigError(f"data.language_share sums to {sum(out.values()):g}: the shares may sum to at most 1")
    return out


def language_probabilities(langs: Sequence[str], share: Mapping[str, float]) -> dict[str, float]:
    """Each of an image's languages (in first-appearance order) and the chance a draw reads it."""
    present = list(dict.fromkeys(langs))
    named = [lang for lang in present if lang in share]
    others = [lang for lang in present if lang not in share]
    named_mass = sum(share[lang] for lang in named)
    probs = {lang: share[lang] for lang in named}
    if others:
        rest = max(0.0, 1.0 - named_mass) / len(others)
        probs.update({lang: rest for lang in others})
    elif named_mass > 0:
        probs = {lang: p / named_mass for lang, p in probs.items()}
    else:  # every present language named with share 0: fall back to uniform over languages
        probs = {lang: 1 / len(present) for lang in present}
    return {lang: probs[lang] for lang in present}


def pick_caption(langs: Sequence[str], r: int, share: Mapping[str, float]) -> int:
    """Position among an image's captions (languages ``langs``) that the random number ``r`` picks."""
    n = len(langs)
    if not share or n < 2 or len(set(langs)) < 2:
        return r % n
    u = ((r >> 40) & ((1 << _LANG_BITS) - 1)) / (1 << _LANG_BITS)
    acc, chosen = 0.0, None
    probs = language_probabilities(langs, share)
    for lang, p in probs.items():
        acc += p
        if p > 0 and u < acc:
            chosen = lang
            break
    if chosen is None:  # rounding at the top end: the last language with any mass
        chosen = [lang for lang, p in probs.items() if p > 0][-1]
    positions = [k for k, lang in enumerate(langs) if lang == chosen]
    return positions[r % len(positions)]
