"""The one record type every data source yields: an image and all of its captions.

A :class:`Record` names an image by a ``key`` unique within its source (a relative path, a tar
member stem, a COCO file name) and holds every caption of that image -- sources merge rows that
repeat an image, so training can sample among the captions. ``langs``, when the source names them,
is each caption's language code (``"en"``, ``"ja"``; ``""`` unknown), parallel to ``captions``; empty
when the source has no language column. The pixels live either in a local
file (``path``), in memory (``data``: encoded bytes), or in an uncompressed tar shard at a known
byte range (``shard``, ``offset``, ``size``), read on demand so that a record of a million-image
webdataset costs a few dozen bytes. :meth:`Record.open` decodes through
:func:`littune.data.decode.load_image` in every case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, BadImage, load_image, os_reason


@dataclass(slots=True)
class Record:
    """An image and its captions. Exactly one of ``path``, ``data`` or ``shard`` locates the pixels."""

    key: str
    captions: list[str] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)  # per caption, or [] when the source names none
    path: str | None = None
    data: bytes | None = None
    shard: str | None = None  # uncompressed tar holding the encoded image (webdataset), read lazily
    offset: int = 0  # byte offset of the member's data in ``shard``
    size: int = 0  # byte size of the member in ``shard``

    def read_bytes(self) -> bytes:
        """The encoded image bytes (raises :class:`BadImage` if they cannot be read)."""
        if self.data is not None:
            return self.data
        if self.shard is not None:
            try:
                with open(self.shard, "rb") as f:
                    f.seek(self.offset)
                    data = f.read(self.size)
            except FileNotFoundError:
                raise BadImage("missing", "tar shard not found", self.where) from None
            except OSError as e:  # a directory, a symbolic link loop, an I/O error
                raise BadImage("missing", f"cannot read the tar shard: {os_reason(e)}", self.where) from None
            if len(data) != self.size:
                raise BadImage("truncated", f"tar shard ends after {len(data)} of {self.size} bytes", self.where)
            if not data:
                raise BadImage("empty file", "0 bytes", self.where)
            return data
        if self.path is None:
            raise BadImage("missing", "record has neither a path nor data", self.key)
        with open(self.path, "rb") as f:
            return f.read()

    def open(self, max_pixels: int | None = DEFAULT_MAX_PIXELS, reduce_to: int | None = None,
             render_to: int | None = None) -> Image.Image:
        """Decode the image to RGB (EXIF-upright, alpha on white); raises :class:`BadImage`.
        ``reduce_to``: a JPEG may be draft-decoded down to this shorter side; ``render_to``: the shorter
        side an SVG is drawn at (:func:`load_image`)."""
        if self.path is not None and self.data is None and self.shard is None:
            return load_image(self.path, max_pixels=max_pixels, reduce_to=reduce_to, render_to=render_to)
        try:
            return load_image(self.read_bytes(), max_pixels=max_pixels, reduce_to=reduce_to, render_to=render_to)
        except BadImage as e:
            if e.source is None:
                raise BadImage(e.reason, e.detail, self.where) from None
            raise

    @property
    def where(self) -> str:
        """Where the image lives, for reports: the file, ``shard.tar:member`` or the key."""
        if self.path is not None:
            return self.path
        if self.shard is not None:
            return f"{self.shard}:{self.key}"
        return self.key
