"""littune.data.decode: every awkward image mode to RGB, every bad file to a BadImage with its reason."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from data_fixtures import DATA, colour_image, encode, png_bytes
from littune.data.decode import BadImage, _white, image_size, load_image


def test_plain_jpeg_path_and_bytes_agree():
    a = load_image(DATA / "chelsea.jpg")
    b = load_image((DATA / "chelsea.jpg").read_bytes())
    assert a.mode == "RGB" and a.size == (451, 300)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_cmyk_jpeg_decodes_to_the_right_colours():
    src = colour_image(7, (64, 48))
    data = encode(src.convert("CMYK"), "JPEG", quality=98)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB"
    err = np.abs(np.asarray(out, dtype=np.int32) - np.asarray(src, dtype=np.int32)).mean()
    assert err < 8, err  # JPEG loss only: no inverted or garbled channels


def test_16bit_greyscale_png_is_scaled_not_clipped():
    arr = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    out = np.asarray(load_image(encode(Image.fromarray(arr), "PNG")))
    assert out.shape == (8, 64, 3)
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
    assert 120 <= out[0, 32, 0] <= 135  # mid-grey stays mid-grey (clipping would give 255)
    assert (out[..., 0] == out[..., 1]).all()


def test_16bit_rgb_and_rgba_png():
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32896
    out = np.asarray(load_image(png_bytes(rgb, 2, 16)))
    assert tuple(out[0, 0]) == (255, 128, 0)
    rgba = np.zeros((4, 5, 4), np.uint16)
    rgba[..., 2] = 65535  # blue, fully transparent -> white
    out = np.asarray(load_image(png_bytes(rgba, 6, 16)))
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_opaque_rgba_gives_the_pixels_compositing_on_white_gives():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
    arr[..., 3] = 255
    out = np.asarray(load_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert (out == arr[..., :3]).all()
    assert (out == np.asarray(_white(Image.fromarray(arr, "RGBA")))).all()
    arr[0, 0, 3] = 0  # one transparent pixel: composited on white, the rest unchanged
    out = np.asarray(load_image(encode(Image.fromarray(arr, "RGBA"), "PNG")))
    assert tuple(out[0, 0]) == (255, 255, 255) and (out[1:] == arr[1:, :, :3]).all()


def test_palette_with_transparency_composites_on_white():
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(0, (0, 0, 5, 10))  # left half: index 0 = transparent (black in the palette)
    data = encode(img, "PNG", transparency=0)
    out = np.asarray(load_image(data))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 9]) == (255, 0, 0)


def test_rgb_png_with_a_transparent_colour():
    img = Image.new("RGB", (4, 4), (10, 20, 30))
    img.putpixel((0, 0), (1, 2, 3))
    out = np.asarray(load_image(encode(img, "PNG", transparency=(10, 20, 30))))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize("mode,value,expected", [
    ("RGBA", (0, 0, 255, 0), (255, 255, 255)),
    ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
    ("LA", (0, 128), (128, 128, 128)),  # black at half alpha on white
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
])
def test_modes_to_rgb(mode, value, expected):
    out = np.asarray(load_image(encode(Image.new(mode, (6, 4), value), "PNG")))
    assert out.shape == (4, 6, 3)
    assert np.abs(out[0, 0].astype(int) - np.asarray(expected)).max() <= 1


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    out = load_image(encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (20, 40)
    arr = np.asarray(out, dtype=int)
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60  # red ends up on top
    assert arr[-3, 10, 2] > 200


def test_gif_first_frame_and_webp():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(load_image(b.getvalue()))[0, 0]) == (255, 0, 0)
    out = load_image(encode(colour_image(1), "WEBP", lossless=True))
    assert np.array_equal(np.asarray(out), np.asarray(colour_image(1)))


def test_bad_files_have_reasons(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "nope.jpg"
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases["empty file"] = tmp_path / "empty.jpg"
    full = encode(colour_image(4, (200, 150)), "JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    cases["truncated"] = tmp_path / "cut.jpg"
    (tmp_path / "text.png").write_text("hello")
    cases["not an image"] = tmp_path / "text.png"
    (tmp_path / "bomb.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(30000, 30000)))
    cases["too many pixels"] = tmp_path / "bomb.png"
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    for reason, path in cases.items():
        with pytest.raises(BadImage) as e:
            load_image(path)
        assert e.value.reason == reason, (path, e.value)
        assert str(path) in str(e.value)
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "link.jpg")
    assert e.value.reason == "missing" and "symbolic link" in e.value.detail
    with pytest.raises(BadImage) as e:
        load_image(b"")
    assert e.value.reason == "empty file"
    with pytest.raises(BadImage) as e:
        load_image("https://example.com/cat.jpg")
    assert e.value.reason == "remote url"


def test_pixel_limit_is_checked_before_decoding():
    data = encode(colour_image(0, (100, 50)), "PNG")
    assert load_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(BadImage) as e:
        load_image(data, max_pixels=4999)
    assert e.value.reason == "too many pixels" and "100x50" in e.value.detail
    # A header that promises a huge image costs nothing: the size is read, no pixel is decoded.
    bomb = png_bytes(np.zeros((1, 1), np.uint8), 0, 8, size=(12000, 9000))
    assert image_size(bomb) == (12000, 9000)
    with pytest.raises(BadImage) as e:
        load_image(bomb)
    assert e.value.reason == "too many pixels"


# -- hostile files: a FIFO, a symlink loop, a huge non-image, a file cut anywhere ----------------------
def _unblock(fifo) -> None:
    """Give a reader stuck in open() on ``fifo`` its writer (and then end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_named_jpg_is_refused_at_once_not_waited_on(tmp_path):
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    got = {}

    def read():
        try:
            load_image(fifo)
        except BadImage as e:
            got["e"] = e

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    try:
        assert not t.is_alive(), "load_image waits for a writer on a FIFO"
    finally:
        _unblock(fifo)
        t.join(5)
    assert got["e"].reason == "not an image" and "not a regular file (a FIFO)" in got["e"].detail
    assert str(fifo) in str(got["e"])
    with pytest.raises(BadImage) as e:
        image_size(fifo)
    assert "FIFO" in e.value.detail


def test_a_directory_and_a_symlink_loop_are_one_line_reasons(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "b.jpg")
    with pytest.raises(BadImage) as e:
        load_image(tmp_path / "folder.jpg")
    assert (e.value.reason, e.value.detail) == ("not an image", "is a directory")
    with pytest.raises(BadImage) as e:  # was OSError [Errno 40]: a traceback in classify and eval
        load_image(tmp_path / "a.jpg")
    assert e.value.reason == "missing" and "symbolic link loop" in e.value.detail


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_file_without_an_image_signature_is_refused_from_its_first_bytes(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(300 * 2**20)  # sparse: costs no disk; it was read whole before Pillow said no

    def refuse():
        with pytest.raises(BadImage) as e:
            load_image(big)
        assert e.value.reason == "not an image" and "no image signature" in e.value.detail

    assert _peak_bytes(refuse) < 2**20


def test_an_image_file_is_decoded_from_the_file_not_read_whole(tmp_path):
    """A real PNG followed by 300 MB of junk decodes to the same pixels, holding none of the junk."""
    good = encode(colour_image(3, (64, 48)), "PNG")
    path = tmp_path / "padded.png"
    with open(path, "wb") as f:
        f.write(good)
        f.truncate(len(good) + 300 * 2**20)
    out = {}
    peak = _peak_bytes(lambda: out.setdefault("img", load_image(path)))
    assert np.array_equal(np.asarray(out["img"]), np.asarray(colour_image(3, (64, 48))))
    assert peak < 2**20, peak


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_a_file_cut_anywhere_is_truncated_not_corrupt(fmt):
    """Pillow words a cut file many ways ("Truncated File Read", "cannot load this image", EOFError...):
    a file of a known format that stops before its end marker is ``truncated`` wherever it is cut, unless
    every pixel was there (a PNG cut in its last chunks decodes to the whole image)."""
    data = encode(colour_image(5, (64, 48)), fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    whole = np.asarray(load_image(data))
    reasons = {}
    for n in range(12, len(data) - 1, max(1, len(data) // 150)):
        try:
            reasons[n] = "whole" if np.array_equal(np.asarray(load_image(data[:n])), whole) else "partial"
        except BadImage as e:
            reasons[n] = e.reason
    reasons = {n: r for n, r in reasons.items() if r != "whole"}
    assert len(reasons) > 10
    wrong = {n: r for n, r in reasons.items() if r != "truncated"}
    assert not wrong, f"{fmt} of {len(data)} bytes cut at: {wrong}"
