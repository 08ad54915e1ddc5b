"""Studies: the main job (``make quickstart``) and the comparisons behind littune's defaults, run end to end.

In: datasets built offline (:mod:`littune.builders`: emoji, Openclipart), cached once (:mod:`littune.cache`).
Out: runs trained by :mod:`littune.train`, scored by :mod:`littune.eval` against baselines, written as tables
(markdown and JSON) and plots under ``out/`` -- the figures of docs/main-job.md and docs/studies.md.

* :mod:`~littune.studies.quickstart` (``python -m littune.studies.quickstart``) and
  :mod:`~littune.studies.quickstart_data` -- the main job and its data.
* :mod:`~littune.studies.settings_study` (``littune study``) -- the paper's tower settings (Lu, LU, Uu, ...).
* :mod:`~littune.studies.tower_study` (``littune study --towers``) -- which image tower to lock.
* :mod:`~littune.studies.text_study` (``python -m littune.studies.text_study``) -- which text tower.
* :mod:`~littune.studies.benchmark` -- the emoji benchmark's data, caches, evaluation and baselines, shared
  by the quickstart and the studies.
"""
