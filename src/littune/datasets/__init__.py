"""Ready-made image-text datasets built offline from package registries.

``littune data emoji`` (:func:`build_emoji`) draws emoji concepts in many independent design
families from npm icon sets, with splits that hold out whole design families and a share of the
concepts, to measure zero-shot transfer honestly. ``littune data openclipart``
(:func:`build_openclipart`) renders Debian's public-domain Openclipart drawings with their titles,
keywords and descriptions. Both write ``image,caption`` CSVs (paths relative to the CSV), a
``datacard.md``, a ``skipped.tsv`` and a ``manifest.json``; both fetch their sources once into the
cache (``$LITTUNE_CACHE`` or ``~/.cache/littune``) and reuse what is already built.
"""

from .emoji import DESIGNS, build_emoji
from .openclipart import build_openclipart

__all__ = ["DESIGNS", "build_emoji", "build_openclipart"]
