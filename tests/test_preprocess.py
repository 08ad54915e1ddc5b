"""littune.preprocess: the eval/train transforms, their uint8 halves, and the key that fingerprints them."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from data_fixtures import colour_image
from littune.preprocess import Preprocess

# one other value for every field: each changes the pixels a tower sees
OTHER = {"size": 96, "resize": 300, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
         "interpolation": "bilinear", "crop_scale": (0.5, 1.0), "crop_ratio": (0.9, 1.1)}


def test_key_is_stable_for_equal_specs():
    assert Preprocess().key() == Preprocess().key()
    assert Preprocess(crop_scale=[0.08, 1]).key() == Preprocess().key()  # lists/ints normalised
    assert Preprocess(size=224, resize=256).key() == Preprocess(size=224).key()  # 224 / 0.875 = 256


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
