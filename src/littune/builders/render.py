"""SVG to PNG: a square RGB picture on white, the same bytes every time.

Both dataset builders draw vector art. :func:`render_svg` rasterises one SVG document with
resvg (fast, Rust; the ``resvg`` binding) and falls back to ``cairosvg`` (libcairo) for the files resvg rejects
(Openclipart has many with odd sizes); which one drew a picture is returned with it. The drawing is
scaled so its longer side fills ``size`` pixels, centred on a white square (aspect ratio kept,
transparent parts become white) and returned as a Pillow RGB image. :func:`save_png` writes it
atomically with fixed encoder settings, so a build renders byte-identical files on every run (one
exception seen: text whose fonts are missing gets resvg's fallback faces, which can differ between
processes; one Openclipart font-sample sheet draws two ways).
System fonts are not loaded for emoji (they contain no text); Openclipart drawings with ``<text>`` get
the system fonts, read once per process.

resvg is called through its tree API: parse, then draw at the fitted size with the scale resvg's own
``--width``/``--height`` use (:func:`_fit_size`), in a third of the time ``resvg-py``'s ``svg_to_bytes``
took (it spent ~8 ms of a 224 px emoji encoding its PNG). On the main job's pictures the bytes are the
same as resvg-py's for every emoji and every drawing without text; the 123 drawings with text are laid
out slightly differently (resvg 0.47 in the binding, 0.48.1 in resvg-py).

Install the renderers with ``pip install resvg cairosvg`` (either one is enough).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from xml.parsers import expat

import numpy as np
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
        from resvg import usvg  # noqa: F401

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
    for name, dist in (("resvg", "resvg"), ("cairosvg", "cairosvg")):
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
            "no SVG renderer installed: `pip install resvg cairosvg` (or `pip install littune[data]`)"
        )


def _png_to_image(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGBA")


@functools.lru_cache(maxsize=2)
def _resvg_options(fonts: bool):
    """resvg's options: CSS pixels (dpi 96, so mm/pt/in sizes draw), system fonts read once if asked."""
    from resvg import usvg

    opts = usvg.Options.default()
    opts.dpi = 96.0
    if fonts:
        opts.load_system_fonts()
    return opts


def _fit_size(w: int, h: int, width: int | None, height: int | None) -> tuple[int, int, float, float]:
    """Pixel size and x/y scale for a ``w`` x ``h`` drawing fitted to ``width`` (else ``height``): the
    arithmetic of resvg's ``--width`` (tiny-skia ``IntSize::scale_to_width``, float32, rounded up)."""
    if w <= 0 or h <= 0:
        raise ValueError(f"empty drawing ({w} x {h})")
    f = np.float32
    if width is not None:
        W, H = int(width), int(np.ceil(f(width) * f(h) / f(w)))
    else:
        W, H = int(np.ceil(f(height) * f(w) / f(h))), int(height)
    return W, H, float(f(W) / f(w)), float(f(H) / f(h))


def _resvg(svg: str, width: int | None, height: int | None, fonts: bool) -> Image.Image:
    from resvg import render, usvg

    svg = svg.strip()
    _check_xml(svg)
    try:
        tree = usvg.Tree.from_str(svg, _resvg_options(fonts))
        W, H, sx, sy = _fit_size(*tree.int_size(), width, height)
        png = render(tree, (sx, 0.0, 0.0, 0.0, sy, 0.0), bg_size=(W, H))
    except BaseException as e:  # the binding turns usvg's errors into a Rust panic, a BaseException
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(str(e).split(": ", 1)[-1][:200]) from None
    return _png_to_image(bytes(png))


def _check_xml(svg: str) -> None:
    """Raise ``ValueError`` (expat's message) unless ``svg`` is well-formed XML: resvg would panic on it."""
    parser = expat.ParserCreate()
    try:
        parser.Parse(svg, True)
    except expat.ExpatError as e:
        raise ValueError(f"not well-formed XML: {e}") from None


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
