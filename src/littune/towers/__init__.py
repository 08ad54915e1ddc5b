"""Image and text towers behind two small interfaces."""

from .image import ImageTower, build_image_tower, parse_image_tower
from .text import TextTower, build_text_tower, train_tokenizer

__all__ = [
    "ImageTower",
    "TextTower",
    "build_image_tower",
    "build_text_tower",
    "parse_image_tower",
    "train_tokenizer",
]
