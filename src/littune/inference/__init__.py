"""Inference: what a trained model computes for its users -- embeddings, zero-shot labels, heat maps.

In: a :class:`~littune.model.LiTModel` and images (paths, Pillow images, records of :mod:`littune.data`) or
texts; for a locked tower, image features already in the embedding cache. Out: L2-normalised float32
embeddings, class probabilities, per-text heat maps over an image -- used by the evaluators
(:mod:`littune.eval`), the trainer's validation, search indexes, serving and export.

* :mod:`~littune.inference.embeddings` -- the batched loops: image and text embeddings, cached image features.
* :mod:`~littune.inference.mixin` -- ``encode_images``/``encode_texts``/``classify``/``heatmap``, the methods
  :class:`~littune.model.LiTModel` inherits.
* :mod:`~littune.inference.heatmap` -- where in an image each text matches (spatial features of the tower).
"""
