"""SVG to PNG: a square picture on white, the same bytes every time.

Both dataset builders draw vector art. :func:`render_png` rasterises one SVG document with
resvg (fast, Rust; the ``resvg`` binding) and falls back to ``cairosvg`` (libcairo) for the files resvg rejects
(Openclipart has many with odd sizes); which one drew a picture is returned with it. The drawing is
scaled so its longer side fills ``size`` pixels, centred on a white square (aspect ratio kept,
transparent parts become white), and returned as the bytes of a PNG file that the builders write
atomically; :func:`render_svg` gives the same picture as a Pillow RGB image. The encoders' settings are
fixed, so a build renders byte-identical files on every run (one exception seen: text whose fonts are
missing gets resvg's fallback faces, which can differ between processes; one Openclipart font-sample
sheet draws two ways). System fonts are not loaded for emoji (they contain no text); Openclipart
drawings with ``<text>`` get the system fonts, read once per process.

resvg is called through its tree API: parse once, then draw. A picture without ``crop`` (emoji) is drawn
straight onto the white square, centred by the drawing's own transform, and resvg encodes the PNG
(RGBA, every pixel opaque): 2.8 ms for a 224 px emoji, where drawing on a transparent page and
compositing and encoding in Pillow took 5.9 (``RENDER_VERSION`` 2, whose pixels differ from these at
anti-aliased edges: resvg composites on white in premultiplied 8-bit). With ``crop`` (Openclipart) the
drawing is first made on a transparent page at the size resvg's own ``--width``/``--height`` give
(:func:`_fit_size`) to find the box of its drawn pixels (again at about the final scale when it covers
little of its page), then that box is drawn straight onto white at the final scale: vector-sharp,
where version 2 cut the pixels and shrank them with Lanczos (13 ms a drawing instead of 16). What a
drawing has beyond its page stays unseen, as on the page. cairosvg, the fallback, draws on a
transparent page and Pillow crops, composites and encodes.

Install the renderers with ``pip install resvg cairosvg`` (either one is enough).
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from xml.parsers import expat

import numpy as np
from PIL import Image

from ..errors import LittuneError


# Bump when the drawing code changes what it produces: builders then re-render their cached PNGs.
RENDER_VERSION = 3


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


_THREAD = threading.local()


def _resvg_options(fonts: bool):
    """resvg's options: CSS pixels (dpi 96, so mm/pt/in sizes draw), system fonts read once if asked. One
    per thread: the binding's options belong to the thread that made them (used in another, they panic)."""
    from resvg import usvg

    made = _THREAD.__dict__
    if fonts not in made:
        made[fonts] = opts = usvg.Options.default()
        opts.dpi = 96.0
        if fonts:
            opts.load_system_fonts()
    return made[fonts]


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


@contextlib.contextmanager
def _rust_panics():
    """The binding turns usvg's errors into a Rust panic, a BaseException: make it a ValueError."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(str(e).split(": ", 1)[-1][:200]) from None


def _tree(svg: str, fonts: bool):
    from resvg import usvg

    svg = svg.strip()
    _check_xml(svg)
    with _rust_panics():
        return usvg.Tree.from_str(svg, _resvg_options(fonts))


def _resvg(svg: str, width: int | None, height: int | None, fonts: bool) -> Image.Image:
    from resvg import render

    tree = _tree(svg, fonts)
    with _rust_panics():
        W, H, sx, sy = _fit_size(*tree.int_size(), width, height)
        png = render(tree, (sx, 0.0, 0.0, 0.0, sy, 0.0), bg_size=(W, H))
    return _png_to_image(bytes(png))


def _centred(w: int, h: int, size: int) -> tuple[float, float, float]:
    """Scale and x/y offset that fit a ``w`` x ``h`` drawing into a ``size`` square, centred."""
    if w <= 0 or h <= 0:
        raise ValueError(f"empty drawing ({w} x {h})")
    s = size / max(w, h)
    return s, (size - w * s) / 2, (size - h * s) / 2


def _resvg_on_white(svg: str, size: int, fonts: bool) -> bytes:
    """resvg draws the picture straight onto a white ``size`` square and encodes the PNG itself."""
    from resvg import render

    tree = _tree(svg, fonts)
    with _rust_panics():
        s, tx, ty = _centred(*tree.int_size(), size)
        png = bytes(render(tree, (s, 0.0, tx, 0.0, s, ty), bg_size=(size, size), bg_color=(255, 255, 255, 255)))
    if _blank(png, size):
        raise ValueError("nothing drawn on the page (blank)")
    return png


def _resvg_cropped_on_white(svg: str, size: int, fonts: bool, margin: float) -> bytes:
    """``crop`` with resvg: find the drawn part's box on a transparent page (again near the final scale
    when the drawing is small on its page), then draw that part straight onto white, fitted inside the
    margin; resvg encodes the PNG."""
    from resvg import render

    tree = _tree(svg, fonts)
    inner = max(1, round(size * (1 - 2 * margin)))
    with _rust_panics():
        w, h = tree.int_size()
        W, H, sx, sy = _fit_size(w, h, size, None) if w >= h else _fit_size(w, h, None, size)
        box = _alpha_box(tree, (sx, 0.0, 0.0, 0.0, sy, 0.0), W, H)
        if box is None:
            raise ValueError("nothing drawn on the page (fully transparent)")
        # in the drawing's units: every pixel the drawing touches is inside the pixel box
        x0, y0, x1, y1 = box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy
        if max(box[2] - box[0], box[3] - box[1]) < 0.9 * inner:  # small on its page: a finer box
            s1, pad = inner / max(x1 - x0, y1 - y0), 1.0 / min(sx, sy)
            ox, oy = x0 - pad, y0 - pad
            fine = _alpha_box(tree, (s1, 0.0, -ox * s1, 0.0, s1, -oy * s1),
                              math.ceil((x1 - x0 + 2 * pad) * s1), math.ceil((y1 - y0 + 2 * pad) * s1))
            if fine is not None:
                x0, y0, x1, y1 = ox + fine[0] / s1, oy + fine[1] / s1, ox + fine[2] / s1, oy + fine[3] / s1
        k = inner / max(x1 - x0, y1 - y0)
        tx, ty = size / 2 - (x0 + x1) / 2 * k, size / 2 - (y0 + y1) / 2 * k
        png = bytes(render(tree, (k, 0.0, tx, 0.0, k, ty), bg_size=(size, size), bg_color=(255, 255, 255, 255)))
    page = (round(tx), round(ty), round(tx + w * k), round(ty + h * k))
    if page[0] > 0 or page[1] > 0 or page[2] < size or page[3] < size:
        png = _white_outside(png, page)  # what the drawing has beyond its page stays unseen, as on the page
    if _blank(png, size):
        raise ValueError("nothing drawn on the page (blank)")
    return png


def _white_outside(png: bytes, box: tuple[int, int, int, int]) -> bytes:
    """The picture with everything outside ``box`` (its page, in pixels) white: ``png`` itself when it
    is (most drawings have nothing beyond their page), else painted white and encoded by Pillow."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    W, H = img.size
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(W, box[2]), min(H, box[3])
    bands = [(0, 0, W, y0), (0, y1, W, H), (0, y0, x0, y1), (x1, y0, W, y1)]
    if all(_white_all_over(img.crop(b)) for b in bands if b[2] > b[0] and b[3] > b[1]):
        return png
    canvas = Image.new("RGB", img.size, (255, 255, 255))
    canvas.paste(img.crop((x0, y0, x1, y1)), (x0, y0))
    return _encode(canvas)


def _alpha_box(tree, transform: tuple, W: int, H: int) -> tuple[int, int, int, int] | None:
    """The pixel box of what ``tree`` draws on a transparent ``W`` x ``H`` page (None: nothing)."""
    from resvg import render

    return _png_to_image(bytes(render(tree, transform, bg_size=(W, H)))).getchannel("A").getbbox()


def _blank(png: bytes, size: int) -> bool:
    """Whether a picture drawn on white is white all over. A blank square deflates to a few hundred
    bytes (far under a byte per 16 pixels), so only a file that small is decoded to look."""
    return len(png) <= size * size // 16 + 1024 and _white_all_over(Image.open(io.BytesIO(png)).convert("RGB"))


def _white_all_over(img: Image.Image) -> bool:
    return all(lo == 255 for lo, _ in img.getextrema())


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


def _picture(draw, svg: str, size: int, fonts: bool, crop: bool, margin: float) -> Image.Image:
    """Draw on a transparent page, check something is drawn, crop (optionally), fit and centre on white."""
    img = _fit(draw, svg, size, fonts)
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError("empty drawing")
    if img.getchannel("A").getbbox() is None:
        raise ValueError("nothing drawn on the page (fully transparent)")
    target = size
    if crop:
        img = _crop(draw, svg, img, size, fonts, margin)
        w, h = img.size
        target = max(1, round(size * (1 - 2 * margin)))
    if (w, h) != (target, target):
        scale = target / max(w, h)
        nw, nh = max(1, min(target, round(w * scale))), max(1, min(target, round(h * scale)))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    rgb = canvas.convert("RGB")
    if _white_all_over(rgb):
        raise ValueError("nothing drawn on the page (blank)")
    return rgb


def _encode(img: Image.Image) -> bytes:
    """PNG bytes with fixed, deterministic encoder settings. zlib level 1: a 224 px emoji encodes in 1.7 ms
    instead of 3.0 (level 6) and decodes a little faster, for files 15% larger; the pixels are the same."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def render_png(svg: str | bytes, size: int = 224, fonts: bool = False, renderers: list[str] | None = None,
               crop: bool = False, margin: float = 0.04) -> tuple[bytes, str]:
    """Render an SVG document to the PNG file of a ``size`` x ``size`` picture on white.

    Returns ``(png_bytes, renderer_name)``. Tries the renderers in order (default: resvg, then cairosvg)
    and raises :class:`RenderError` naming every failure when none can draw it, or when the drawing
    is empty (zero-sized, fully transparent, or white all over). resvg draws the picture onto white
    in its place and encodes the PNG (RGBA, every pixel opaque). With ``crop`` the picture is cut to
    the box of its drawn pixels and fitted inside a ``margin`` (share of ``size``) of white: for clip
    art drawn small on a large page. cairosvg's pictures are composited and encoded by Pillow (RGB).
    """
    if isinstance(svg, bytes):
        svg = svg.decode("utf-8", errors="replace")
    order = renderers or available_renderers()
    if not order:
        require_renderer()
    errors = []
    for name in order:
        try:
            if name == "resvg":
                png = _resvg_cropped_on_white(svg, size, fonts, margin) if crop else _resvg_on_white(svg, size, fonts)
                return png, name
            return _encode(_picture(_BACKENDS[name], svg, size, fonts, crop, margin)), name
        except Exception as e:  # each renderer raises its own exception types
            text = str(e).strip()
            errors.append(f"{name}: {text.splitlines()[0][:200] if text else type(e).__name__}")
    raise RenderError("; ".join(errors) or "no renderer")


def _fitted_size(w: float, h: float, shorter: int, longest: int) -> tuple[int, int, float, float]:
    """:func:`_fit_size` with the shorter side at ``shorter``, or the longer at ``longest`` if it would pass it."""
    W, H, sx, sy = _fit_size(w, h, shorter, None) if w <= h else _fit_size(w, h, None, shorter)
    if max(W, H) > longest:
        W, H, sx, sy = _fit_size(w, h, longest, None) if w >= h else _fit_size(w, h, None, longest)
    return W, H, sx, sy


def _drawn_fitted(name: str, svg: str, shorter: int, longest: int, fonts: bool, aspect: float | None) -> Image.Image:
    if name == "resvg":  # resvg measures the drawing and draws it straight onto white
        from resvg import render

        tree = _tree(svg, fonts)
        with _rust_panics():
            W, H, sx, sy = _fitted_size(*tree.int_size(), shorter, longest)
            png = render(tree, (sx, 0.0, 0.0, 0.0, sy, 0.0), bg_size=(W, H), bg_color=(255, 255, 255, 255))
        return Image.open(io.BytesIO(bytes(png))).convert("RGB")
    import cairosvg  # draws at the size it is told, on a transparent page

    W, H, _, _ = _fitted_size(aspect or 1.0, 1.0, shorter, longest)
    img = _png_to_image(cairosvg.svg2png(bytestring=svg.encode("utf-8"), output_width=W, output_height=H, unsafe=False))
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    canvas.alpha_composite(img)
    return canvas.convert("RGB")


def render_fitted(svg: str, shorter: int, longest: int, fonts: bool = False, aspect: float | None = None,
                  renderers: list[str] | None = None) -> tuple[Image.Image, str]:
    """An SVG drawn at its own aspect ratio on white, for reading a user's drawing as an image:
    ``(Pillow RGB image, renderer name)``, its shorter side ``shorter`` px (a drawing so thin that its longer
    side would pass ``longest`` gets that instead). resvg first, then cairosvg, as :func:`render_png`;
    ``aspect`` (width / height, default square) sizes cairosvg's page (resvg measures the drawing itself).
    A blank drawing is a white picture here. Raises :class:`RenderError` naming every renderer's failure."""
    errors = []
    for name in renderers or available_renderers():
        try:
            return _drawn_fitted(name, svg, shorter, longest, fonts, aspect), name
        except Exception as e:  # each renderer raises its own exception types
            text = str(e).strip()
            errors.append(f"{name}: {text.splitlines()[0][:200] if text else type(e).__name__}")
    raise RenderError("; ".join(errors) or "no renderer installed")


def render_svg(svg: str | bytes, size: int = 224, fonts: bool = False,
               renderers: list[str] | None = None, crop: bool = False,
               margin: float = 0.04) -> tuple[Image.Image, str]:
    """:func:`render_png`'s picture as a Pillow RGB image: ``(image, renderer_name)``."""
    png, name = render_png(svg, size=size, fonts=fonts, renderers=renderers, crop=crop, margin=margin)
    img = Image.open(io.BytesIO(png))
    img.load()
    return img.convert("RGB"), name
