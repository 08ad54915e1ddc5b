"""littune.data.preprocess: the eval/train transforms, their uint8 halves, and the key that fingerprints them."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import colour_image
from littune.data.preprocess import Preprocess

# one other value for every field: each changes the pixels a tower sees
OTHER = {"size": 96, "resize": 300, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
         "interpolation": "bilinear", "crop_scale": (0.5, 1.0), "crop_ratio": (0.9, 1.1), "decode": "fast"}


def test_key_is_stable_for_equal_specs():
    assert Preprocess().key() == Preprocess().key()
    assert Preprocess(crop_scale=[0.08, 1]).key() == Preprocess().key()  # lists/ints normalised
    assert Preprocess(size=224, resize=256).key() == Preprocess(size=224).key()  # 224 / 0.875 = 256


def test_key_of_a_default_augmentation_spec_is_the_one_saved_models_and_caches_carry():
    """Tower fingerprints hash this string: it must not move, or every saved model fails to load."""
    assert Preprocess(size=224).key() == ("size=224,resize=256,mean=[0.485, 0.456, 0.406],"
                                          "std=[0.229, 0.224, 0.225],interp=bicubic")


@pytest.mark.parametrize("name", sorted(OTHER))
def test_key_changes_with_every_field(name):
    """Bug: crop_scale and crop_ratio were left out, so caches of other augmentations were resumed."""
    assert {f.name for f in dataclasses.fields(Preprocess)} == set(OTHER)  # a new field needs a case here
    assert Preprocess(**{name: OTHER[name]}).key() != Preprocess().key()


def test_specs_differing_only_in_crop_scale_make_other_views_and_other_keys():
    a, b = Preprocess(size=32, crop_scale=(0.08, 1.0)), Preprocess(size=32, crop_scale=(0.9, 1.0))
    img = colour_image(3, size=(64, 48))
    assert not torch.equal(a.train(img, random.Random(0)), b.train(img, random.Random(0)))
    assert torch.equal(a.eval(img), b.eval(img))  # only the augmentation differs ...
    assert a.key() != b.key()  # ... and still the key (hence the tower fingerprint) differs


@pytest.mark.parametrize("mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
                                      ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_normalize_of_uint8_is_bit_identical_to_eval_for_every_byte_value(mean, std):
    """Each output element depends only on its byte and channel: 256 values x 3 channels is every case."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))
    p = Preprocess(size=16, resize=16, mean=mean, std=std)
    px = p.eval_uint8(img)
    assert px.dtype == torch.uint8 and px.shape == (3, 16, 16)
    assert all(len(torch.unique(px[c])) == 256 for c in range(3))  # the crop kept every value
    out = p.normalize(px[None])
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    assert torch.equal(out[0], p.eval(img))


def test_uint8_halves_match_eval_and_train_on_real_images():
    p = Preprocess(size=32)
    imgs = [colour_image(i, size=s) for i, s in enumerate([(48, 36), (30, 90), (200, 201), (12, 8)])]
    imgs += [colour_image(9).convert("RGBA"), colour_image(10).convert("L")]
    batch = torch.stack([p.eval_uint8(im) for im in imgs])
    assert torch.equal(p.normalize(batch), torch.stack([p.eval(im) for im in imgs]))
    for seed in range(8):  # the same draws from the generator: the same crop and flip
        views = [p.train_uint8(im, random.Random(seed)) for im in imgs]
        assert torch.equal(p.normalize(torch.stack(views)),
                           torch.stack([p.train(im, random.Random(seed)) for im in imgs]))
    assert torch.equal(p.normalize(batch[0]), p.eval(imgs[0]))  # one image (3, S, S) works too
    with pytest.raises(ValueError, match="uint8"):
        p.normalize(batch.float())


# -- the eval view of a thin image: bounded memory, the same pixels for every ordinary image -------------
def _eval_before_the_bound(p: Preprocess, img: Image.Image) -> Image.Image:
    """The exact eval view as littune computed it at 7664144 (resize the whole image, then crop): the
    reference every ordinary image must keep, bit for bit."""
    from littune.data.preprocess import _RESAMPLE

    w, h = img.size
    scale = p.resize_to / min(w, h)
    nw, nh = max(p.size, round(w * scale)), max(p.size, round(h * scale))
    left, top = (nw - p.size) // 2, (nh - p.size) // 2
    return img.resize((nw, nh), _RESAMPLE[p.interpolation]).crop((left, top, left + p.size, top + p.size))


ORDINARY = [(640, 480), (480, 640), (500, 375), (1024, 768), (1920, 1080), (1080, 1920), (451, 300), (224, 224),
            (256, 256), (300, 200), (100, 80), (37, 53), (12, 8), (4000, 3000), (3000, 400), (200, 2000)]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
def test_eval_view_of_ordinary_images_is_bit_identical_to_resize_then_crop(interpolation):
    """Pillow's resize(box=...) alone would change 1-29 levels of some pixels of 24 of 66 such images."""
    rng = np.random.default_rng(0)
    specs = [Preprocess(size=224), Preprocess(size=32, resize=32), Preprocess(size=384, resize=384)]
    for spec in (dataclasses.replace(s, interpolation=interpolation) for s in specs):
        for w, h in ORDINARY:
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            want = np.asarray(_eval_before_the_bound(spec, img)).transpose(2, 0, 1)
            assert np.array_equal(spec.eval_uint8(img).numpy(), want), (spec.size, w, h)


THIN = """
import resource, sys, time
from PIL import Image
from littune.data.preprocess import Preprocess
w, h = int(sys.argv[1]), int(sys.argv[2])
img = Image.new("RGB", (w, h), (200, 30, 30))
img.putpixel((0, h // 2), (0, 0, 255))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
px = Preprocess(size=224).eval_uint8(img)  # shorter side to 256, centre crop 224
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, time.perf_counter() - t, tuple(px.shape))
"""


@pytest.mark.parametrize("w,h", [(1, 12000), (40000, 1)])
def test_the_eval_view_of_a_thin_image_needs_a_bounded_intermediate(w, h):
    """1 x 12,000 px took 3.1 GB (resized whole to 256 x 3,072,000, then cropped); 40,000 x 1 would take 10 GB."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", THIN, str(w), str(h)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, seconds, shape = out.stdout.split(maxsplit=2)
    assert shape.strip() == "(3, 224, 224)"
    assert int(grown) < 100 * 2**20, f"{w}x{h}: the eval view grew the process by {int(grown) / 2**20:.0f} MiB"
    assert float(seconds) < 1.0
