"""Hostile input: the files a careless user or an attacker puts where images should be, and damaged models.

The corpus (:func:`hostile_corpus`) holds good images of six formats next to every bad thing that
stopped, hung or blew up ``littune embed`` / ``classify`` before (issue 23, items 16-18): a FIFO named
``.jpg``, a 2 GB sparse non-image named ``.png``, a file name that is not UTF-8, a 1 x 12,000 PNG,
a truncated JPEG, an empty file, a symbolic link loop, a directory named ``x.jpg``, a text file named
``.jpg``, a PNG whose header asks for 900 M pixels. Each run must embed (or classify) every good image
once, report every bad one with its reason, add up, stay within bounded memory and never hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_fixtures import colour_image, png_bytes, tiny_tower_arg
from littune.cli import main

ROOT = Path(__file__).resolve().parent.parent


# -- a damaged model folder -----------------------------------------------------------------------------
@pytest.fixture
def saved_model(tmp_path, tiny_model, one_thread):
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    colour_image(1).save(tmp_path / "cat.png")
    return folder


def _classify(model: Path, image: Path, capsys) -> tuple[int, list[str]]:
    rc = main(["classify", "--model", str(model), "--labels", "cat,dog", str(image)])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_damaged_model_safetensors_is_one_line_naming_the_file(saved_model, capsys):
    weights = saved_model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"littune classify: error: {weights} is damaged or not a safetensors file")
    weights.write_text("<html>404 Not Found</html>")  # something else saved under the name
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1 and f"{weights} is damaged or not a safetensors file" in err[0]


def test_a_model_safetensors_of_the_wrong_shape_is_one_line_naming_the_tensor(saved_model, capsys):
    from safetensors.torch import load_file, save_file
    import torch

    weights = saved_model / "model.safetensors"
    state = load_file(str(weights))
    state["image_head.bias"] = torch.zeros(17)  # the model's is (16,): a model of another embed_dim
    save_file(state, str(weights), metadata={"format": "pt"})
    rc, err = _classify(saved_model, saved_model.parent / "cat.png", capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"littune classify: error: {weights} does not match its config: image_head.bias is [17] "
                      "in the file, [16] in the model")


def test_classify_shows_an_image_name_that_is_not_utf8_with_escapes(saved_model, capsys):
    """A good image under a Latin-1 name: classified, its name printed as ``caf\\xe9.png`` (printing the
    raw name to a strict UTF-8 stdout ended the run with "surrogates not allowed")."""
    folder = os.fsencode(saved_model.parent)
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as f:
        f.write((saved_model.parent / "cat.png").read_bytes())
    name = os.fsdecode(os.path.join(folder, b"caf\xe9.png"))
    assert main(["classify", "--model", str(saved_model), "--labels", "cat,dog", name, "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{saved_model.parent}/caf\\xe9.png"
