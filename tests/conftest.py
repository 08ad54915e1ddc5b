"""Shared fixtures: tiny towers and captions so tests run in seconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# littune's cache folder (ONNX exports of towers, downloads, the converted e5-small) is the test session's
# own, never ~/.cache, and is removed when the session's process exits.
if "LITTUNE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["LITTUNE_CACHE"] = tempfile.mkdtemp(prefix="littune-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LITTUNE_CACHE"], True)

CAPTIONS = [
    "a red apple", "a green apple", "a cat on a mat", "a black dog", "a yellow school bus",
    "a blue car", "ein roter Apfel", "un chat noir", "猫が好きです", "قطة سوداء", "🍎 apple emoji",
] * 5

TINY_TEXT = {"type": "transformer", "width": 32, "depth": 1, "heads": 2, "context_length": 16, "vocab_size": 300}


@pytest.fixture
def tiny_config():
    from littune import LiTConfig
    from littune.towers.tiny import SPEC

    def make(setting: str = "Lu", **kw):
        return LiTConfig(setting=setting, image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16, **kw)

    return make


@pytest.fixture
def tiny_model(tiny_config):
    from littune import LiTModel

    def make(setting: str = "Lu", **kw):
        return LiTModel.from_config(tiny_config(setting, **kw), captions=CAPTIONS)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
