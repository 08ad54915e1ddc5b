"""What an image file is from its first bytes, and whether it visibly stops before its end.

:func:`identify` names the format of a file from its signature (the first :data:`HEAD_BYTES` bytes): the
formats littune lists as images (JPEG, PNG, GIF, WebP, BMP, TIFF) and a few more that Pillow opens, and
SVG: ``SVG`` for a file that starts (after a byte order mark and white space) with XML markup --
``<?xml``, ``<svg``, a comment or a DOCTYPE; whether its root element is ``<svg>`` is seen when it is
parsed -- and ``SVGZ`` for gzip data (a ``.svgz``; what it holds is checked when it is unpacked), both
in :data:`SVG_FORMATS`, read by :mod:`littune.data.svg`. :func:`load_image
<littune.data.decode.load_image>` reads that head before anything else, so that a file with no image
signature and more than :data:`UNKNOWN_MAX_BYTES` bytes is refused without being read, and a file that
Pillow fails on is reported ``truncated`` when :func:`ends_early` sees that it stops before its format's
end (a JPEG without its end-of-image marker, a PNG without ``IEND``, a GIF without its trailer, a WebP
or BMP shorter than its header says) -- whatever words Pillow chose for the error.
"""

from __future__ import annotations

import struct

#: bytes read from the start of a file to identify its format
HEAD_BYTES = 32
#: bytes read from the end of a file that failed to decode, to see whether it is cut short
TAIL_BYTES = 32
#: a file above this size whose first bytes are no image signature is refused unread (no image
#: format littune reads lacks a signature, bar TGA; an uncompressed 9459 x 9459 RGBA image is 358 MB,
#: but that has one)
UNKNOWN_MAX_BYTES = 64 * 2**20

#: the formats :func:`identify` names that are drawn by :mod:`littune.data.svg`, not decoded by Pillow
SVG_FORMATS = ("SVG", "SVGZ")
_MARKUP = (b"<?xml", b"<svg", b"<!--", b"<!doctype")

_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\xffO\xffQ", "JPEG2000"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
)


def identify(head: bytes) -> str | None:
    """The format whose signature ``head`` (a file's first bytes) starts with, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "AVIF"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PPM"
    for sig, fmt in _SIGNATURES:
        if head.startswith(sig):
            return fmt
    if head.startswith(b"\x1f\x8b"):
        return "SVGZ"
    return "SVG" if _markup(head) else None


def _markup(head: bytes) -> bool:
    """Does ``head`` start with XML markup (UTF-8, or UTF-16 after its byte order mark)?"""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        head = head[2:].decode("utf-16-le" if head[:1] == b"\xff" else "utf-16-be", "ignore").encode("ascii", "ignore")
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n").lower()
    return head.startswith(_MARKUP)


def ends_early(fmt: str | None, head: bytes, tail: bytes, size: int) -> bool:
    """Does a file of format ``fmt`` (first bytes ``head``, last bytes ``tail``, ``size`` bytes in all)
    stop before its format's end? False where the format has no end to check."""
    end = tail.rstrip(b"\x00\r\n\t ")  # padding some writers leave after the end marker
    if fmt == "JPEG":
        return not end.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return not tail.endswith(b"IEND\xaeB`\x82")
    if fmt == "GIF":
        return not end.endswith(b";")
    if fmt == "WEBP" and len(head) >= 8:
        return size < 8 + struct.unpack("<I", head[4:8])[0]
    if fmt == "BMP" and len(head) >= 6:
        declared = struct.unpack("<I", head[2:6])[0]
        return declared > 0 and size < declared
    return False
