"""Image-text data: sources (CSV/TSV, JSONL, webdataset tars, image folders, COCO captions), one
:class:`Record` type out of all of them, and robust image decoding (:func:`load_image`)."""

from .decode import BadImage, load_image
from .records import Record
from .sources import Source, open_source

__all__ = ["BadImage", "Record", "Source", "load_image", "open_source"]
