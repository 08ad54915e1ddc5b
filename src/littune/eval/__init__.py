"""Evaluation: zero-shot classification and image-text retrieval, measured the way CLIP_benchmark does.

* :mod:`littune.eval.templates` -- prompt template sets kept as data (CLIP's 80 ImageNet templates,
  CLIP's 7, a short set, ``{}`` alone) or your own file.
* :mod:`littune.eval.zeroshot` -- class embeddings from names and templates (prompt ensembling),
  ``acc1``/``acc5``/``mean_per_class_recall``, per-class table and confusion matrix.
* :mod:`littune.eval.retrieval` -- recall@K both ways with the COCO protocol (several captions per
  image), keys ``image_retrieval_recall@K`` and ``text_retrieval_recall@K``.
* :mod:`littune.eval.sets` -- the evaluation sets: class folders, label CSVs and captioned sources.

The image and text embeddings they are scored with come from :mod:`littune.inference.embeddings` (images
decoded and run through the model, or image features read from an embedding cache for a locked tower);
nothing here imports :mod:`littune.inference.mixin`.

Results files written by ``littune eval`` use CLIP_benchmark's layout
(``{"dataset", "model", "task", "metrics": {...}}``) so existing tooling reads them.

The names below are imported on first use (PEP 562): a command's ``--help`` reads the template set names
from :mod:`littune.eval.templates` without importing torch.
"""

from __future__ import annotations

from .. import _lazy_exports

#: public name -> the module that defines it
_LAZY = {"load_templates": "templates", "retrieval_metrics": "retrieval", "zeroshot_classifier": "zeroshot",
         "zeroshot_metrics": "zeroshot"}

__all__ = ["load_templates", "retrieval_metrics", "zeroshot_classifier", "zeroshot_metrics"]
__getattr__, __dir__ = _lazy_exports(__name__, _LAZY)
