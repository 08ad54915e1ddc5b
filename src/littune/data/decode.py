"""Decode any image a dataset may hold into an upright 8-bit RGB Pillow image, or say why not.

:func:`load_image` is the one door through which littune reads pixels. It accepts a path or the
raw encoded bytes (a webdataset member), applies the EXIF orientation, and converts every mode
Pillow can open to RGB: palette images (with or without a transparent colour), ``LA``/``PA``/
``RGBA`` (composited on white, the usual background of clip art and emoji), ``CMYK`` (Adobe
inverted JPEGs included), 16-bit and 32-bit integer greyscale (scaled, not clipped), float images,
1-bit and ``YCbCr``/``LAB``/``HSV``. Multi-frame files (GIF, animated WebP) give their first frame.
SVG drawings (``.svg``, gzip'd ``.svgz``; known by their content) are drawn by :mod:`littune.data.svg`
through the dataset builders' renderer, on white, their shorter side at ``render_to`` pixels (the
pre-processing's :attr:`~littune.data.preprocess.Preprocess.resize_to`; default 256); an SVG's
``info[SIZE_INFO]`` is the size it was drawn at.

Anything that cannot be decoded raises :class:`BadImage` with a short ``reason`` that reports can
count -- ``missing``, ``empty file``, ``not an image``, ``truncated``, ``too many pixels``,
``corrupt`` or ``remote url``, and for SVG ``unsafe`` (an external entity...), ``too large`` and ``no renderer``
(the ``data`` extra is missing) -- and a ``detail`` for the human. The pixel limit (default
Pillow's own 89,478,485, about 9459 x 9459) is checked from the header before any pixel is
decoded, so a decompression bomb costs nothing.

A file is opened without blocking and must be a regular file (a directory or a FIFO named
``x.jpg`` is ``not an image``; a symbolic link loop or any other failure to open is ``missing``,
"cannot read"); its format is identified from its first bytes (:mod:`littune.data.sniff`), a large
file with no image signature is refused unread, and the image is decoded from the file, never read
whole first: memory follows the pixels, not the file's size. A file of a known format that Pillow
fails on is ``truncated`` when it stops before its format's end, whatever Pillow's wording.

``reduce_to`` (the fast decoding of :class:`~littune.data.preprocess.Preprocess`, ``decode="fast"``) lets
a JPEG be decoded at the smallest DCT scale, 1/2, 1/4 or 1/8 (``Image.draft``), whose shorter side
is still at least ``reduce_to`` pixels: far fewer pixels decoded, slightly different ones. Other
formats ignore it. Every image decoded from a JPEG carries ``info[JPEG_INFO]``, the DCT scale used, and
every image ``info[SIZE_INFO]``, the file's full size, upright.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .sniff import HEAD_BYTES, SVG_FORMATS, TAIL_BYTES, UNKNOWN_MAX_BYTES, ends_early, identify

DEFAULT_MAX_PIXELS = 89_478_485

#: ``Image.info`` key of an image decoded from a JPEG: the DCT scale it was decoded at (1, 2, 4 or 8)
JPEG_INFO = "littune_jpeg_scale"
#: ``Image.info`` key of every image :func:`load_image` decodes: the file's full size, upright (a JPEG
#: decoded at a DCT scale is smaller)
SIZE_INFO = "littune_size"

#: File extensions littune treats as images when it lists a folder or a tar shard.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg", ".svgz")

#: The reasons :class:`BadImage` may carry, in the order reports list them.
REASONS = ("missing", "empty file", "not an image", "truncated", "too many pixels", "corrupt", "remote url",
           "unsafe", "too large", "no renderer")


class BadImage(Exception):
    """An image that cannot be decoded. ``reason`` is one of :data:`REASONS`; ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "", source: str | None = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"{source}: {text}" if source else text)


@contextlib.contextmanager
def _opened(src: str | Path | bytes | bytearray | memoryview) -> Iterator[tuple[BinaryIO, int, str | None]]:
    """``(binary file, size in bytes, name or None)`` of a path or of encoded bytes; raises :class:`BadImage`
    for what is no file to decode (missing, empty, a directory, a FIFO, a symbolic link loop...)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise BadImage("empty file", "0 bytes")
        yield io.BytesIO(data), len(data), None
        return
    name = str(src)
    if name.startswith(("http://", "https://", "ftp://", "s3://", "gs://")):
        raise BadImage("remote url", "littune reads local files only; download the images first", name)
    with _open_regular(name) as (f, size):
        if not size:
            raise BadImage("empty file", "0 bytes", name)
        yield f, size, name


@contextlib.contextmanager
def _open_regular(name: str) -> Iterator[tuple[BinaryIO, int]]:
    """A regular file opened for reading, and its size. Opened without blocking (a FIFO would wait for
    a writer for ever), then checked with ``fstat``; the file object has no name, so Pillow reads it
    through it (never maps the file by name)."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        detail = "dangling symbolic link" if os.path.islink(name) else "no such file"
        raise BadImage("missing", detail, name) from None
    except IsADirectoryError:
        raise BadImage("not an image", "is a directory", name) from None
    except OSError as e:  # permission, a symbolic link loop, a name too long, an I/O error...
        raise BadImage("missing", f"cannot read: {os_reason(e)}", name) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "is a directory" if stat.S_ISDIR(st.st_mode) else f"not a regular file ({_kind(st.st_mode)})"
            raise BadImage("not an image", kind, name)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        yield f, st.st_size


def os_reason(e: OSError) -> str:
    """Why a file could not be opened or read, in a few words (``symbolic link loop``, ``Permission denied``)."""
    return "symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


def _sniffed(f: BinaryIO, size: int, name: str | None) -> tuple[str | None, bytes]:
    """The format of the file ``f`` from its first bytes (and those bytes); a file above
    :data:`~littune.data.sniff.UNKNOWN_MAX_BYTES` with no image signature is refused unread."""
    head = f.read(HEAD_BYTES)
    f.seek(0)
    fmt = identify(head)
    if fmt is None and size > UNKNOWN_MAX_BYTES:
        raise BadImage("not an image", f"{size:,} bytes and no image signature in its first bytes", name)
    return fmt, head


def _tail(f: BinaryIO, size: int) -> bytes:
    try:
        f.seek(max(0, size - TAIL_BYTES))
        return f.read(TAIL_BYTES)
    except (OSError, ValueError):
        return b""


def _white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha onto a white background."""
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _scaled_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit ``L``, scaling instead of clipping."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.float32) / 257.0
    elif img.mode == "I":
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo >= 0 and hi <= 255:
            arr = arr.astype(np.float32)
        elif lo >= 0 and hi <= 65535:  # 16-bit data in a 32-bit container (PNG, TIFF)
            arr = arr.astype(np.float32) / 257.0
        else:
            arr = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1.0))
    else:  # "F": [0, 1] floats are scaled, anything else is taken as 0..255
        arr = arr.astype(np.float32)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB (alpha composited on white)."""
    mode = img.mode
    if mode == "RGB":  # an RGB PNG may name one colour transparent (tRNS)
        return _white(img) if "transparency" in img.info else img
    if mode == "P":
        # A palette image may carry a transparent index (tRNS) or per-entry alpha.
        if "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"):
            return _white(img)
        return img.convert("RGB")
    if mode == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
        return img.convert("RGB")  # opaque everywhere (resvg's drawings on white): the same pixels, 3x cheaper
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _white(img)
    if mode == "L" and "transparency" in img.info:  # a greyscale PNG with a transparent grey level
        return _white(img)
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scaled_to_8bit(img).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImage("corrupt", f"cannot convert mode {mode} to RGB ({e})") from None


def _draft(img: Image.Image, reduce_to: int | None) -> None:
    """Decode the JPEG ``img`` at the smallest DCT scale whose shorter side stays >= ``reduce_to``
    (None: full size), and say which in its ``info``."""
    w, h = img.size
    s = reduce_to / min(w, h) if reduce_to else 1.0
    scale = 1
    if s < 1:  # Pillow picks the largest of 1/8, 1/4, 1/2 keeping both sides >= the size asked for
        img.draft("RGB", (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        scale = round(w / img.size[0])
    img.info[JPEG_INFO] = scale


def load_image(src: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               reduce_to: int | None = None, render_to: int | None = None) -> Image.Image:
    """Decode ``src`` (a path or encoded bytes) into an upright RGB image.

    Raises :class:`BadImage` for a missing or empty file, one that is no regular file (a directory,
    a FIFO), a file that is not an image, a truncated or corrupt one, or one with more than
    ``max_pixels`` pixels (``None``: Pillow's own limit only). A file is identified from its first
    bytes and decoded from the file (never read whole first). ``reduce_to``: a JPEG may be decoded
    at a DCT scale down to this shorter side (module doc). ``render_to``: the shorter side an SVG is
    drawn at (:attr:`Preprocess.resize_to <littune.data.preprocess.Preprocess.resize_to>`; None: 256).
    """
    with _opened(src) as (f, size, name):
        fmt, head = _sniffed(f, size, name)
        if fmt in SVG_FORMATS:
            return _svg(f, size, fmt, name, render_to, max_pixels)
        try:
            return _decode(f, max_pixels, reduce_to)
        except BadImage as e:
            if e.source is None and name is not None:
                raise BadImage(e.reason, e.detail, name) from None
            raise
        except Image.DecompressionBombError as e:
            raise BadImage("too many pixels", str(e), name) from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, MemoryError,
                UnidentifiedImageError) as e:
            raise _failure(e, fmt, head, _tail(f, size), size, name) from None


def _svg(f: BinaryIO, size: int, fmt: str, name: str | None, render_to: int | None,
         max_pixels: int | None) -> Image.Image:
    """An SVG drawn by :mod:`littune.data.svg`; its refusals as :class:`BadImage`."""
    from .svg import SvgError, read_svg

    try:
        img = read_svg(f, size, fmt, render_to, max_pixels)
    except SvgError as e:
        raise BadImage(e.reason, e.detail, name) from None
    except OSError as e:  # an I/O error reading the file
        raise BadImage("missing", f"cannot read: {os_reason(e)}", name) from None
    img.info[SIZE_INFO] = img.size
    return img


def _decode(f: BinaryIO, max_pixels: int | None, reduce_to: int | None) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(f)
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadImage("too many pixels", f"{w}x{h} = {w * h:,} pixels > limit {max_pixels:,}")
        if img.format == "JPEG":
            _draft(img, reduce_to)
        img.load()
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to do
        rgb = to_rgb(img)
        rgb.info[SIZE_INFO] = (h, w) if turned else (w, h)
        return rgb


def _failure(e: Exception, fmt: str | None, head: bytes, tail: bytes, size: int, name: str | None) -> BadImage:
    """The :class:`BadImage` for Pillow's error ``e`` on a file of format ``fmt`` (from its signature):
    ``truncated`` when the file stops before its format's end or Pillow says so (in any case),
    ``not an image`` when neither the signature nor Pillow knows the format, else ``corrupt``."""
    msg = str(e) if isinstance(e, OSError) and not isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
    low = msg.lower()
    if ends_early(fmt, head, tail, size) or any(w in low for w in ("truncat", "broken data stream", "premature end")):
        return BadImage("truncated", msg if fmt is None else f"{fmt} file cut short: {msg}", name)
    if isinstance(e, UnidentifiedImageError):
        if fmt is None:
            return BadImage("not an image", "Pillow cannot identify the format", name)
        return BadImage("corrupt", f"a {fmt} signature, but Pillow cannot read the file", name)
    return BadImage("corrupt", msg, name)


def image_size(src: str | Path | bytes) -> tuple[int, int]:
    """Width and height from the header only (no decoding; an SVG: the size :func:`load_image` draws it at
    by default); raises :class:`BadImage`."""
    with _opened(src) as (f, size, name):
        fmt, head = _sniffed(f, size, name)
        if fmt in SVG_FORMATS:
            return _svg(f, size, fmt, name, None, DEFAULT_MAX_PIXELS).size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(f).size
        except Image.DecompressionBombError as e:
            raise BadImage("too many pixels", str(e), name) from None
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError) as e:
            raise _failure(e, fmt, head, _tail(f, size), size, name) from None
