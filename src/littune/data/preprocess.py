"""Image preprocessing as the image tower specifies it.

Each image tower carries a :class:`Preprocess` spec (input size, resize rule, mean/std). The
evaluation transform is *resize the shorter side, then centre crop*; the training augmentation is
the Inception-style random resized crop plus horizontal flip. Both produce float32 CHW tensors
normalised with the tower's mean and std. Pillow and numpy only: no torchvision needed.

Each transform also comes in two halves, so that data-loader workers can ship 4x fewer bytes:
:meth:`Preprocess.eval_uint8` / :meth:`Preprocess.train_uint8` give the resized, cropped pixels as
uint8 ``(3, S, S)``, and :meth:`Preprocess.normalize` turns a stacked batch of them into exactly what
``eval`` / ``train`` return (bit-identical on CPU; the tests check every byte value per channel).

``decode`` says how exactly a JPEG is decoded and shrunk. ``exact`` (the default) decodes every pixel
and resizes in one filter pass. ``fast`` decodes a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8,
``Image.draft``) that still covers the resize target (:attr:`Preprocess.draft_to`; the caller's decoder
applies it, see :func:`littune.data.decode.load_image`), and resizes a JPEG with Pillow's
``reducing_gap`` (a cheap integer box reduction first, where the image is far larger than the target),
resampling only the part of it that the centre crop keeps (the same geometry; about half the work
on a 4:3 photo; the filter's weights are computed from other offsets, so a pixel may differ by a
level or two). The draft serves the eval view: where augmented views are cut from the same decoded
image (a cache with ``views``, training on the fly), the JPEG is decoded whole, so the random crops
keep their resolution and their draws. Other formats are decoded and resized as with ``exact``.
``fast`` changes pixels slightly, so it enters :meth:`Preprocess.key` (and the tower's fingerprint);
``exact`` keeps the old key.

The exact eval view resizes the whole image and then crops, as it always has, as long as the resized
image stays within :data:`MAX_RESIZED_PIXELS` (16.8 M pixels: an aspect ratio up to 256:1 at a
shorter side of 256): every ordinary image gets the very same pixels. A thinner image (1 x 12,000 px
would be resized to 256 x 3,072,000, 3 GB, to keep 224 x 224 of it) is resampled in the crop's box
alone (Pillow's ``resize(box=...)``): the same geometry in a few kB, pixels close to, not equal to,
what the whole resize gave (the filter's weights are computed from other offsets: on a random 3 x 3000
image 30% of the values differ, by up to 10 levels). Such images took gigabytes before, if they fit at all.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from PIL import Image

#: how images are decoded and shrunk (see the module doc); the first is the default
DECODES = ("exact", "fast")
#: Pillow's ``reducing_gap`` in ``fast`` decoding of a JPEG (3.0: "indistinguishable from fair resampling")
REDUCING_GAP = 3.0
#: the most pixels the exact eval view resizes a whole image to before cropping (64 MiB as Pillow stores
#: RGB); a thinner image is resampled in the crop's box alone (module doc)
MAX_RESIZED_PIXELS = 2**24

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """What a tower expects: ``size`` square input, shorter side resized to ``resize`` first."""

    size: int = 224
    resize: int | None = None  # shorter side before the centre crop; default size / 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    # Training augmentation (Inception crop): area and aspect-ratio ranges.
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0))
    crop_ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3))
    decode: str = "exact"  # "fast": JPEG draft decoding and reducing_gap (module doc)

    def __post_init__(self):
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(_RESAMPLE)}")
        if self.decode not in DECODES:
            raise ValueError(f"unknown decode {self.decode!r}; use one of {', '.join(DECODES)}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_scale", tuple(float(s) for s in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(s) for s in self.crop_ratio))

    @property
    def resize_to(self) -> int:
        return self.resize if self.resize else int(math.floor(self.size / 0.875))

    @property
    def draft_to(self) -> int | None:
        """With ``decode="fast"``: the shorter side a JPEG may be draft-decoded down to (``resize_to``),
        for the eval view; None with ``exact``."""
        return self.resize_to if self.decode == "fast" else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**d)

    def key(self) -> str:
        """A short stable string for fingerprints, covering every field (all of them change the pixels a
        tower sees; the crop ranges change the augmented views).

        The fields of the first version (size, resize, mean, std, interpolation) keep their old
        spelling, and any other field enters only when it differs from its default: the key of a
        default-augmentation spec -- and so the fingerprint of every tower, model and cache made before
        the crop ranges entered -- is unchanged, while any other crop range gives another key."""
        key = (f"size={self.size},resize={self.resize_to},mean={list(self.mean)},std={list(self.std)},"
               f"interp={self.interpolation}")
        for f in fields(self):
            if f.name not in _FIRST_KEY_FIELDS and getattr(self, f.name) != _DEFAULTS[f.name]:
                key += f",{f.name}={json.dumps(getattr(self, f.name))}"
        return key

    # -- transforms -------------------------------------------------------------------------------
    def eval(self, img: Image.Image) -> torch.Tensor:
        """Resize the shorter side to ``resize_to``, centre crop ``size``, normalise: float32 (3, S, S)."""
        return self._normalise(self._eval_image(img))

    def train(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Inception-style random resized crop + random horizontal flip, then normalise."""
        return self._normalise(self._train_image(img, rng or random))

    def eval_uint8(self, img: Image.Image) -> torch.Tensor:
        """:meth:`eval` before normalising: the resized, cropped pixels as uint8 (3, S, S)."""
        return _chw_uint8(self._eval_image(img))

    def train_uint8(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """:meth:`train` before normalising (the same draws from ``rng``): uint8 (3, S, S)."""
        return _chw_uint8(self._train_image(img, rng or random))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(..., 3, S, S)`` (a batch of :meth:`eval_uint8` / :meth:`train_uint8`) to the
        float32 tensor :meth:`eval` / :meth:`train` give, on the pixels' device: ``x / 255``, minus the
        mean, over the std, the same three float32 operations in the same order (bit-identical on CPU)."""
        if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"normalize wants uint8 pixels (..., 3, S, S), got {pixels.dtype} {list(pixels.shape)}")
        dev = pixels.device
        # Tensors, not Python scalars: CUDA turns division by a scalar into a multiplication by its
        # reciprocal, which can differ from the true quotient in the last bit.
        full = torch.full((1, 1, 1), 255.0, dtype=torch.float32, device=dev)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=dev).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=dev).view(3, 1, 1)
        return (pixels.to(torch.float32) / full - mean) / std

    def eval_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(left, top, right, bottom)``: the part of a ``width x height`` image that :meth:`eval` keeps
        (the centre crop after resizing the shorter side), in the image's own pixels."""
        scale = self.resize_to / min(width, height)
        nw, nh = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return (left * width / nw, top * height / nh, (left + self.size) * width / nw, (top + self.size) * height / nh)

    def _normalise(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def _eval_image(self, img: Image.Image) -> Image.Image:
        img = img.convert("RGB") if img.mode != "RGB" else img
        w, h = img.size
        scale = self.resize_to / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        gap = self._gap(img)
        if gap or nw * nh > MAX_RESIZED_PIXELS:
            # fast decoding of a JPEG, or a thin image whose whole resize would be huge: resample only the
            # part of the image the centre crop keeps
            box = (left * w / nw, top * h / nh, (left + self.size) * w / nw, (top + self.size) * h / nh)
            return img.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=box, reducing_gap=gap)
        img = img.resize((nw, nh), _RESAMPLE[self.interpolation])
        return img.crop((left, top, left + self.size, top + self.size))

    def _train_image(self, img: Image.Image, rng) -> Image.Image:
        img = img.convert("RGB") if img.mode != "RGB" else img
        box = self._crop_box(*img.size, rng)
        img = img.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=box, reducing_gap=self._gap(img))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def _gap(self, img: Image.Image) -> float | None:
        """Pillow's ``reducing_gap`` for ``img``: :data:`REDUCING_GAP` for a JPEG in ``fast`` decoding."""
        return REDUCING_GAP if self.decode == "fast" and _from_jpeg(img) else None

    def _crop_box(self, w: int, h: int, rng) -> tuple[int, int, int, int]:
        """The Inception crop: area in ``crop_scale``, log-uniform aspect in ``crop_ratio``, 10 tries."""
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            log_r = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
            ratio = math.exp(rng.uniform(*log_r))
            cw = int(round(math.sqrt(target * ratio)))
            ch = int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return (x0, y0, x0 + cw, y0 + ch)
        # fall back to a centre crop at a clamped aspect ratio
        in_ratio = w / h
        if in_ratio < self.crop_ratio[0]:
            cw, ch = w, int(round(w / self.crop_ratio[0]))
        elif in_ratio > self.crop_ratio[1]:
            ch, cw = h, int(round(h * self.crop_ratio[1]))
        else:
            cw, ch = w, h
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return (x0, y0, x0 + cw, y0 + ch)


#: the fields :meth:`Preprocess.key` spelled from the start, and every field's default
_FIRST_KEY_FIELDS = ("size", "resize", "mean", "std", "interpolation")
_DEFAULTS = Preprocess().to_dict()


def _from_jpeg(img: Image.Image) -> bool:
    """Was ``img`` decoded from a JPEG? (:func:`littune.data.decode.load_image` marks the images it
    decodes from one; a Pillow image opened directly says so in its ``format``.)"""
    from .decode import JPEG_INFO

    return JPEG_INFO in img.info or img.format == "JPEG"


def _chw_uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))
