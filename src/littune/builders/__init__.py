"""Dataset builders: ready image-text datasets built offline from package registries.

``littune data emoji`` (:func:`build_emoji`) draws emoji concepts in many independent design
families from npm icon sets, with splits that hold out whole design families and a share of the
concepts, to measure zero-shot transfer honestly. ``littune data openclipart``
(:func:`build_openclipart`) renders Debian's public-domain Openclipart drawings with their titles,
keywords and descriptions. Both write ``image,caption`` CSVs (paths relative to the CSV), a
``datacard.md``, a ``skipped.tsv`` (``where, reason, detail``) and a ``manifest.json``; both fetch
their sources once into the cache (``$LITTUNE_CACHE`` or ``~/.cache/littune``) and reuse what is
already built.

The shared steps: :mod:`.fetch` (npm and Debian packages into the cache), :mod:`.splits` (seeded
hash splits), :mod:`.render` (one SVG to a PNG), :mod:`.render_pool` (many, in parallel, reusing
what is drawn) and :mod:`.output` (the output folder, tables, shards, skip reasons). The two
builders are the packages :mod:`.emoji` and :mod:`.openclipart`. (Sources that a user points
littune at are :mod:`littune.data`; labelled evaluation sets are :mod:`littune.eval.sets`.)
"""

from .emoji import DESIGNS, build_emoji
from .openclipart import build_openclipart

__all__ = ["DESIGNS", "build_emoji", "build_openclipart"]
