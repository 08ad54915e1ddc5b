"""Inference helpers mixed into :class:`littune.model.LiTModel` (encode images/texts, classify)."""


class InferenceMixin:
    """Methods for using a trained model; see the evaluation issue."""
