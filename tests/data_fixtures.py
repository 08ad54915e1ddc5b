"""Small real files for the data, decode and cache tests: images of every awkward kind, sources of
every format (each with multi-caption images), and the tiny tower spec as a command-line argument."""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data"


def tiny_tower_arg() -> str:
    from littune.towers.tiny import SPEC

    return json.dumps(SPEC)


def colour_image(i: int, size=(48, 36)) -> Image.Image:
    """A deterministic RGB image, different for every ``i`` (gradient + a coloured block)."""
    w, h = size
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(base[c] + (xx * (c + 1) + yy * (3 - c)) * 3) % 256 for c in range(3)], axis=-1)
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    arr[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, size=3)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def png_bytes(arr: np.ndarray, color_type: int, bitdepth: int, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB); ``size`` overrides the header's size."""
    h, w = arr.shape[:2]
    dt = ">u2" if bitdepth == 16 else "u1"
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(dt).tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    hw = size or (w, h)
    ihdr = struct.pack(">IIBBBBB", hw[0], hw[1], bitdepth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_images(folder: Path, n: int, start: int = 0, ext: str = "png", size=(48, 36)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + n):
        name = f"im{i:04d}.{ext}"
        img = colour_image(i, size)
        if ext in ("jpg", "jpeg"):
            img.save(folder / name, quality=92)
        else:
            img.save(folder / name)
        names.append(name)
    return names


def captions_for(i: int) -> list[str]:
    """Image ``i`` has 1 to 3 captions."""
    return [f"picture {i} variant {k}" for k in range(1 + i % 3)]


def write_csv(root: Path, n: int = 6, delimiter: str = ",", name: str = "pairs.csv") -> Path:
    """``image,caption`` with one row per caption (so multi-caption images span several rows)."""
    names = write_images(root / "img", n)
    rows = [(f"img/{nm}", c) for i, nm in enumerate(names) for c in captions_for(i)]
    # interleave: the second caption of an image comes after other images' rows
    rows = sorted(rows, key=lambda r: (r[1].endswith("0") is False, r[0], r[1]))
    path = root / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def bad_inputs(folder: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A folder with good awkward images and bad files, and a CSV listing them all.

    Returns (csv path, {bad image name: expected reason}, [good image names in CSV order]).
    """
    folder.mkdir(parents=True, exist_ok=True)
    good: list[str] = []
    bad: dict[str, str] = {}
    colour_image(1).save(folder / "plain.jpg", quality=92)
    good.append("plain.jpg")
    # CMYK JPEG (a good image)
    colour_image(2).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    good.append("cmyk.jpg")
    # 16-bit greyscale PNG and 16-bit RGB PNG (good)
    Image.fromarray((np.arange(48 * 36).reshape(36, 48) * 37).astype(np.uint16)).save(folder / "grey16.png")
    good.append("grey16.png")
    rgb16 = np.zeros((36, 48, 3), np.uint16)
    rgb16[..., 0] = 65535
    rgb16[..., 1] = np.arange(48)[None, :] * 1300
    (folder / "rgb16.png").write_bytes(png_bytes(rgb16, 2, 16))
    good.append("rgb16.png")
    # Palette PNG with a transparent index (good)
    pal = colour_image(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    good.append("palette.png")
    # Bad ones
    bad["missing.jpg"] = "missing"
    (folder / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    full = encode(colour_image(4, (200, 150)), "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    bad["truncated.jpg"] = "truncated"
    (folder / "notes.png").write_text("this is a text file, not a PNG\n")
    bad["notes.png"] = "not an image"
    # A PNG whose header claims 30000 x 30000 pixels (a decompression bomb): never decoded
    (folder / "huge.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(30000, 30000)))
    bad["huge.png"] = "too many pixels"
    order = ["plain.jpg", "missing.jpg", "cmyk.jpg", "empty.jpg", "grey16.png", "truncated.jpg", "rgb16.png",
             "notes.png", "palette.png", "huge.png"]
    with open(folder / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in order:
            w.writerow([name, f"a picture called {name}"])
            w.writerow([name, f"another caption of {name}"])
    return folder / "list.csv", bad, [n for n in order if n in good]
