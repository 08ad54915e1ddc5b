"""SVG drawings read as images: ``.svg`` and ``.svgz`` files, drawn by the renderer the dataset builders use.

:func:`littune.data.decode.load_image` hands :func:`read_svg` a file whose first bytes are XML markup or
gzip data (:data:`~littune.data.sniff.SVG_FORMATS`). The drawing is rasterised by
:func:`littune.builders.render.render_fitted` -- resvg first, cairosvg for what resvg refuses, as the
builders draw -- at its own aspect ratio with its shorter side at ``render_to`` pixels: the
pre-processing's resize target (:attr:`~littune.data.preprocess.Preprocess.resize_to`, 256 for a 224 px tower),
so that the centre crop holds drawn vector detail, not an enlarged bitmap; composited on white, RGB, as
every decoded image. The size follows from the pre-processing, which is in the tower's fingerprint.

A file is untrusted. Before a renderer sees it, the document is parsed here (expat) and written again:

* external entities (``<!ENTITY x SYSTEM "file:///etc/passwd">``) and parameter entities are refused
  (``unsafe``); nothing outside the file is ever read (expat fetches no DTD and no entity: a DOCTYPE
  naming the SVG DTD, as most editors write, is fine).
* internal entities (Adobe Illustrator declares its namespaces as entities; cairosvg refuses every entity,
  ``EntitiesForbidden``) are expanded, at most :data:`MAX_ENTITY_CHARS` characters in all, counted from
  the declarations before any is expanded: a "billion laughs" is refused before it grows.
* references to other files or the network (``href`` / ``xlink:href`` of ``<image>``, ``<use>``,
  ``<feImage>``... other than a ``#fragment`` or a ``data:`` URL holding a PNG, JPEG, GIF or WebP) are
  removed, and the drawing is drawn without them, as a browser draws an SVG image (resvg would read a
  local path, absolute or relative to the working directory). An embedded raster counts against the
  pixel limit; an embedded SVG is removed (resvg would draw it with its own references unchecked).
* elements nested more than :data:`MAX_DEPTH` deep are refused (resvg crashes the process near 100,000).
* a file (or a ``.svgz``'s content) over :data:`MAX_SVG_BYTES` is refused unread (``too large``). The
  drawing's declared size (``width="1e9"``) allocates nothing: it is drawn at ``render_to``, its longer side
  at most :data:`MAX_SIDE` pixels (and the pixel limit).
* the renderers run in a helper process with a memory and a time limit
  (:mod:`littune.builders.render_sandbox`): a drawing that would make resvg abort (a pattern or a filter
  region scaled to hundreds of gigabytes) or keep cairosvg busy for minutes (``<use>`` chains) is
  ``too large``, and the caller goes on.

Reasons (:class:`SvgError`, a :class:`~littune.data.decode.BadImage` for the caller): ``no renderer`` (neither
resvg nor cairosvg installed), ``unsafe``, ``too large`` (the file, or what drawing it would take),
``too many pixels`` (an embedded raster), ``not an image`` (XML whose root is not ``<svg>``, gzip data
holding no SVG), ``truncated`` (the document stops early) and ``corrupt`` (not well-formed, or no renderer
can draw it).
"""

from __future__ import annotations

import base64
import codecs
import io
import re
import urllib.parse
import warnings
import zlib
from typing import BinaryIO
from xml.parsers import expat

from .sniff import HEAD_BYTES, identify

#: the most bytes of SVG text read (a ``.svg`` file, or what a ``.svgz`` unpacks to)
MAX_SVG_BYTES = 32 * 2**20
#: the most characters all of a document's internal entity references may expand to, together
MAX_ENTITY_CHARS = 2**22
#: the deepest element nesting read
MAX_DEPTH = 512
#: the longest side, in pixels, a drawing is drawn at (a thin drawing's shorter side is then less than asked)
MAX_SIDE = 8192
#: the shorter side a drawing is drawn at when the caller names no pre-processing (a 224 px tower's resize)
DEFAULT_RENDER_TO = 256
INSTALL = "SVG needs `pip install 'littune[data]'` (resvg or cairosvg)"

_RASTERS = ("PNG", "JPEG", "GIF", "WEBP")  # what an embedded image (a data: URL) may hold
_REF = re.compile(r"&([^\s&;#<>\"']+);")
_DECLARED = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_PREDEFINED = {"amp", "lt", "gt", "quot", "apos"}
_PX = {"": 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0, "em": 16.0,
       "ex": 8.0}
_LENGTH = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(px|pt|pc|mm|cm|in|em|ex)?\s*$")
_END_ERRORS = {expat.errors.codes[m] for m in (  # what expat says of a document that stops early
    expat.errors.XML_ERROR_NO_ELEMENTS, expat.errors.XML_ERROR_UNCLOSED_TOKEN, expat.errors.XML_ERROR_PARTIAL_CHAR,
    expat.errors.XML_ERROR_UNCLOSED_CDATA_SECTION)}


class SvgError(Exception):
    """An SVG that is not drawn: ``reason`` (a :data:`~littune.data.decode.REASONS` word) and ``detail``."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def read_svg(f: BinaryIO, size: int, fmt: str, render_to: int | None, max_pixels: int | None):
    """The drawing in the file ``f`` (``size`` bytes, :func:`~littune.data.sniff.identify`'s ``fmt``) as a
    Pillow RGB image, its shorter side ``render_to`` px (None: :data:`DEFAULT_RENDER_TO`); raises :class:`SvgError`."""
    from ..builders import render, render_sandbox

    if size > MAX_SVG_BYTES:
        raise SvgError("too large", f"{size:,} bytes of {'gzip data' if fmt == 'SVGZ' else 'SVG'} "
                                    f"(the limit is {MAX_SVG_BYTES:,})")
    data = f.read(MAX_SVG_BYTES + 1)
    if fmt == "SVGZ":
        data = _gunzip(data)
    doc = _Document(_text(data), max_pixels)
    doc.parse()
    names = _installed()
    if not names:
        raise SvgError("no renderer", INSTALL)
    shorter = int(render_to or DEFAULT_RENDER_TO)
    longest = max(shorter, min(MAX_SIDE, max_pixels // shorter if max_pixels else MAX_SIDE))
    try:
        img, _ = render_sandbox.render_fitted(doc.text, shorter, longest, doc.has_text, doc.aspect, names)
    except render_sandbox.RenderLimit as e:
        raise SvgError("too large", e.why) from None
    except render_sandbox.NoHelper as e:
        raise SvgError("no renderer", str(e)) from None
    except render.RenderError as e:
        raise SvgError("corrupt", f"no renderer could draw it ({e})") from None
    return img


def _installed() -> list[str]:
    """The renderers installed (resvg, cairosvg), found without importing them: the helper does that."""
    import importlib.util

    names = []
    for name in ("resvg", "cairosvg"):
        try:
            if importlib.util.find_spec(name) is not None:
                names.append(name)
        except (ImportError, ValueError):
            pass
    return names


def _gunzip(data: bytes) -> bytes:
    """A ``.svgz``'s content, at most :data:`MAX_SVG_BYTES` of it; it must be SVG markup."""
    unpack = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = unpack.decompress(data, MAX_SVG_BYTES + 1)
    except zlib.error as e:
        raise SvgError("corrupt", f"gzip data that does not unpack ({e})") from None
    if len(out) > MAX_SVG_BYTES:
        raise SvgError("too large", f"gzip data unpacking to more than {MAX_SVG_BYTES:,} bytes")
    if identify(out[:HEAD_BYTES]) != "SVG":
        raise SvgError("not an image", "gzip data that holds no SVG")
    if not unpack.eof:
        raise SvgError("truncated", "gzip data cut short")
    return out


def _text(data: bytes) -> str:
    """The document as text: by its byte order mark, else its XML declaration's encoding, else UTF-8."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        enc = "utf-16"
    elif data.startswith(codecs.BOM_UTF8):
        enc = "utf-8-sig"
    else:
        m = _DECLARED.match(data.lstrip(b" \t\r\n")[:256])
        enc = m.group(1).decode("ascii") if m else "utf-8"
    try:
        return data.decode(enc, errors="replace")
    except LookupError:
        raise SvgError("corrupt", f"an unknown text encoding {enc!r}") from None


class _Document:
    """One SVG document parsed by expat and written again, safely (module doc): ``text`` after :meth:`parse`."""

    def __init__(self, source: str, max_pixels: int | None):
        self.source, self.max_pixels = source, max_pixels
        self.out: list[str] = []
        self.entities: dict[str, str] = {}
        self.depth, self.root, self.has_text, self.aspect = 0, None, False, None

    def parse(self) -> None:
        p = expat.ParserCreate()
        p.ordered_attributes = True
        p.buffer_text = True
        p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        p.EntityDeclHandler = self._entity
        p.UnparsedEntityDeclHandler = lambda name, *_: self._external(name)
        p.ExternalEntityRefHandler = lambda *_: self._external("an external DTD")
        p.SkippedEntityHandler = lambda name, _: self._refuse("corrupt", f"an undefined entity &{name};")
        p.EndDoctypeDeclHandler = self._budget
        p.StartElementHandler, p.EndElementHandler = self._start, self._end
        p.CharacterDataHandler = lambda data: self.out.append(_escape(data))
        try:
            p.Parse(self.source, True)
        except expat.ExpatError as e:
            raise self._malformed(e) from None
        self.text = "".join(self.out)

    def _malformed(self, e: expat.ExpatError) -> SvgError:
        if e.code in _END_ERRORS:
            return SvgError("truncated", f"the SVG stops early ({e})")
        if self.root is None and "<svg" not in self.source[:4096].lower():
            return SvgError("not an image", f"XML markup, but no SVG ({e})")
        return SvgError("corrupt", f"not well-formed XML ({e})")

    @staticmethod
    def _refuse(reason: str, detail: str):
        raise SvgError(reason, detail)

    def _external(self, name: str):
        raise SvgError("unsafe", f"{name} outside the file: not read (external entities are not allowed)")

    def _entity(self, name, is_parameter, value, base, system_id, public_id, notation):
        if is_parameter:
            self._refuse("unsafe", f"a parameter entity %{name}; (not allowed)")
        if value is None:
            self._external(f"the entity &{name}; names {system_id or public_id!r},")
        self.entities[name] = value

    def _budget(self) -> None:
        """Before any entity is expanded: what all references to them would expand to, in characters."""
        sizes: dict[str, int] = {}

        def expanded(name: str, seen: tuple) -> int:
            if name in _PREDEFINED or name not in self.entities:
                return 1
            if name in seen:
                self._refuse("corrupt", f"the entity &{name}; refers to itself")
            if name not in sizes:
                value = self.entities[name]
                sizes[name] = len(value) + sum(min(expanded(r, seen + (name,)), MAX_ENTITY_CHARS + 1)
                                               for r in _REF.findall(value))
            return sizes[name]

        total = 0
        try:
            for ref in _REF.findall(self.source):
                total += expanded(ref, ())
                if total > MAX_ENTITY_CHARS:
                    break
        except RecursionError:
            self._refuse("unsafe", "entities defined through thousands of others")
        if total > MAX_ENTITY_CHARS:
            self._refuse("unsafe", f"its entities expand to more than {MAX_ENTITY_CHARS:,} characters")

    def _start(self, name: str, attrs: list) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self._refuse("unsafe", f"elements nested more than {MAX_DEPTH} deep")
        local = name.rpartition(":")[2]
        pairs = dict(zip(attrs[::2], attrs[1::2]))
        if self.root is None:
            self.root = name
            if local != "svg":
                self._refuse("not an image", f"XML whose root element is <{name}>, not <svg>")
            if 0 in (_length(pairs.get("width")), _length(pairs.get("height"))):
                self._refuse("corrupt", "an empty drawing (its width or height is 0)")
            self.aspect = _aspect(pairs)
        self.has_text = self.has_text or local == "text"
        kept = "".join(f' {k}="{_escape(v, attr=True)}"' for k, v in pairs.items()
                       if k.rpartition(":")[2] != "href" or self._inside(v))
        self.out.append(f"<{name}{kept}>")

    def _end(self, name: str) -> None:
        self.depth -= 1
        self.out.append(f"</{name}>")

    def _inside(self, href: str) -> bool:
        """Keep a reference to a part of this document, or an embedded raster within the pixel limit."""
        href = href.strip()
        if href.startswith("#"):
            return True
        if href[:5].lower() != "data:":
            return False
        wh = _raster_size(href)
        limit = self.max_pixels
        if wh is not None and limit is not None and wh[0] * wh[1] > limit:
            self._refuse("too many pixels", f"an embedded {wh[0]}x{wh[1]} image > limit {limit:,}")
        return wh is not None


def _raster_size(url: str) -> tuple[int, int] | None:
    """Width and height of the raster image in a ``data:`` URL, from its header (None: no PNG, JPEG, GIF or
    WebP that Pillow reads; resvg would draw an SVG found there, whatever the URL's media type says)."""
    from PIL import Image

    head, _, payload = url.partition(",")
    try:
        raw = base64.b64decode(payload) if head.lower().endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
        if identify(raw[:HEAD_BYTES]) not in _RASTERS:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                return im.size
    except Image.DecompressionBombError:
        return (2**31, 2**31)
    except Exception:  # a broken data URL draws nothing: it is dropped
        return None


def _escape(text: str, attr: bool = False) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if attr:  # a parsed attribute value keeps its white space characters only as references
        text = text.replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    return text


def _aspect(root: dict) -> float | None:
    """Width / height of the drawing from the root's ``width`` and ``height`` (else ``viewBox``): the page
    cairosvg draws on (resvg measures the drawing itself). None when neither says."""
    w, h = _length(root.get("width")), _length(root.get("height"))
    if not (w and h):
        box = re.split(r"[\s,]+", root.get("viewBox", "").strip())
        try:
            w, h = (float(box[2]), float(box[3])) if len(box) == 4 else (None, None)
        except ValueError:
            return None
    return w / h if w and h and w > 0 and h > 0 and 1e-6 < w / h < 1e6 else None


def _length(value: str | None) -> float | None:
    m = _LENGTH.match(value or "")
    return float(m.group(1)) * _PX[m.group(2) or ""] if m else None
