"""SVG to PNG: a square RGB picture on white, the same bytes every time.

Both dataset builders draw vector art. :func:`render_svg` rasterises one SVG document with
``resvg-py`` (fast, Rust) and falls back to ``cairosvg`` (libcairo) for the files resvg rejects
(Openclipart has many with odd sizes); which one drew a picture is returned with it. The drawing is
scaled so its longer side fills ``size`` pixels, centred on a white square (aspect ratio kept,
transparent parts become white) and returned as a Pillow RGB image. :func:`save_png` writes it
atomically with fixed encoder settings, so a build renders byte-identical files on every run.
System fonts are not loaded for emoji (they contain no text), which keeps resvg fast; Openclipart
drawings with ``<text>`` get the system fonts.

Install the renderers with ``pip install resvg-py cairosvg`` (either one is enough).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from ..errors import LittuneError
from ..fileio import atomic_write


# Bump when the drawing code changes what it produces: builders then re-render their cached PNGs.
RENDER_VERSION = 2


class RenderError(LittuneError):
    """An SVG could not be drawn by any available renderer (the message says why)."""


def available_renderers() -> list[str]:
    """Names of the installed renderers, in the order they are tried."""
    names = []
    try:
        import resvg_py  # noqa: F401

        names.append("resvg")
    except ImportError:
        pass
    try:
        import cairosvg  # noqa: F401

        names.append("cairosvg")
    except (ImportError, OSError):  # OSError: the cairo shared library is missing
        pass
    return names


def renderer_versions() -> dict[str, str]:
    """Installed renderer versions, for datacards and build stamps."""
    from importlib import metadata

    out = {}
    for name, dist in (("resvg", "resvg-py"), ("cairosvg", "cairosvg")):
        if name in available_renderers():
            try:
                out[name] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[name] = "unknown"
    return out


def require_renderer() -> None:
    """Raise a clear error when neither renderer is installed."""
    if not available_renderers():
        raise LittuneError(
            "no SVG renderer installed: `pip install resvg-py cairosvg` (or `pip install littune[data]`)"
        )


def _png_to_image(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGBA")


def _resvg(svg: str, width: int | None, height: int | None, fonts: bool) -> Image.Image:
    import resvg_py

    # dpi=96 is the CSS ratio; resvg-py's default (0) turns mm/pt/in sizes into zero ("invalid size").
    png = resvg_py.svg_to_bytes(svg_string=svg, width=width, height=height, dpi=96.0, skip_system_fonts=not fonts)
    if isinstance(png, str):  # very old resvg-py returned base64 text
        import base64

        png = base64.b64decode(png)
    return _png_to_image(bytes(png))


def _cairo(svg: str, width: int | None, height: int | None, fonts: bool) -> Image.Image:
    import cairosvg

    png = cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=width, output_height=height, unsafe=False)
    return _png_to_image(png)


_BACKENDS = {"resvg": _resvg, "cairosvg": _cairo}


def _fit(draw, svg: str, size: int, fonts: bool) -> Image.Image:
    """Draw with the longer side at ``size`` (two passes only for tall drawings)."""
    img = draw(svg, size, None, fonts)
    w, h = img.size
    if h > size + 1:
        img = draw(svg, None, size, fonts)
    return img


def _crop(draw, svg: str, img: Image.Image, size: int, fonts: bool, margin: float) -> Image.Image:
    """Crop to the drawn pixels; re-render larger first when the drawing is small on its page."""
    box = img.getchannel("A").getbbox()
    inner = max(1, round(size * (1 - 2 * margin)))
    longest = max(box[2] - box[0], box[3] - box[1])
    if longest < 0.9 * inner:
        k = min(8.0, inner / longest)
        w = max(1, round(img.size[0] * k))
        big = draw(svg, w, None, fonts)
        box2 = big.getchannel("A").getbbox()
        if box2 is not None:
            img, box = big, box2
    return img.crop(box)


def render_svg(svg: str | bytes, size: int = 224, fonts: bool = False,
               renderers: list[str] | None = None, crop: bool = False,
               margin: float = 0.04) -> tuple[Image.Image, str]:
    """Render an SVG document to a ``size`` x ``size`` RGB image on white.

    Returns ``(image, renderer_name)``. Tries the renderers in order (default: resvg, then cairosvg)
    and raises :class:`RenderError` naming every failure when none can draw it, or when the drawing
    is empty (fully transparent or zero-sized). With ``crop`` the picture is cut to its drawn
    pixels (re-rendered at higher resolution when it covers little of its page) and fitted inside a
    ``margin`` (share of ``size``) of white: for clip art drawn small on a large page.
    """
    if isinstance(svg, bytes):
        svg = svg.decode("utf-8", errors="replace")
    order = renderers or available_renderers()
    if not order:
        require_renderer()
    errors = []
    for name in order:
        try:
            img = _fit(_BACKENDS[name], svg, size, fonts)
        except Exception as e:  # each renderer raises its own exception types
            errors.append(f"{name}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            continue
        w, h = img.size
        if w == 0 or h == 0:
            errors.append(f"{name}: empty drawing")
            continue
        if img.getchannel("A").getbbox() is None:
            errors.append(f"{name}: nothing drawn on the page (fully transparent)")
            continue
        target = size
        if crop:
            try:
                img = _crop(_BACKENDS[name], svg, img, size, fonts, margin)
            except Exception as e:
                errors.append(f"{name}: {str(e).strip()[:200] or type(e).__name__}")
                continue
            w, h = img.size
            target = max(1, round(size * (1 - 2 * margin)))
        if (w, h) != (target, target):
            scale = target / max(w, h)
            nw, nh = max(1, min(target, round(w * scale))), max(1, min(target, round(h * scale)))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        canvas.alpha_composite(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
        return canvas.convert("RGB"), name
    raise RenderError("; ".join(errors) or "no renderer")


def save_png(img: Image.Image, path: str | Path) -> None:
    """Write a PNG atomically (:func:`littune.fileio.atomic_write`) with fixed, deterministic encoder settings.
    Not fsync'ed (as before the move to fileio): thousands of renders that can be redone would pay ~5 ms each.
    zlib level 1: a 224 px emoji encodes in 1.7 ms instead of 3.0 (level 6) and decodes a little faster,
    for files 15% larger; the pixels are the same (PNG is lossless), so PNGs drawn at level 6 stay valid."""
    atomic_write(path, lambda f: img.save(f, format="PNG", optimize=False, compress_level=1), durable=False)
