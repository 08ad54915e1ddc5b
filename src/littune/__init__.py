"""littune: Locked-image Tuning (LiT) -- a locked image model, a text tower that learns to read it."""

__version__ = "0.1.0"

from .model import LiTConfig, LiTModel  # noqa: E402
from .openclip import create_model_and_transforms, create_model_from_pretrained, get_tokenizer  # noqa: E402
from .tower_settings import parse_setting  # noqa: E402


def load(directory: str, map_location: str = "cpu") -> LiTModel:
    """Shortcut for :meth:`LiTModel.from_pretrained`."""
    return LiTModel.from_pretrained(directory, map_location=map_location)


__all__ = ["LiTConfig", "LiTModel", "create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer",
           "load", "parse_setting", "__version__"]
