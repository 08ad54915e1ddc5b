"""The model: the two towers, their projection heads and temperature, saved and loaded as a folder.

In: a :class:`~littune.config.LiTConfig` (which image and text tower, the tower setting ``Lu``/``LU``...),
towers from :mod:`littune.towers`. Out: a :class:`LiTModel` that the trainer (:mod:`littune.train`) fits,
the evaluators (:mod:`littune.eval`) score, and inference, serving and export use.

* :mod:`littune.model.two_towers` -- :class:`LiTModel`, ``save_pretrained``/``from_pretrained``, :func:`save_trained`.
* :mod:`littune.model.settings` -- the paper's two-letter tower settings and their learning-rate multipliers.

``LiTModel`` and ``save_trained`` are imported on first use (PEP 562): the settings, which the configuration
checks, import without torch.
"""

from __future__ import annotations

from .. import _lazy_exports

#: public name -> the module that defines it
_LAZY = {"LiTModel": "two_towers", "save_trained": "two_towers"}

__all__ = ["LiTModel", "save_trained"]
__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
