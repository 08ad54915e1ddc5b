"""How `littune train` ends, as a user sees it: the final validation results as a table with each retrieval
direction named.

One tiny run (the coloured squares and stripes of test_trainer, a zero-shot set of class folders and a
captioned retrieval set, each embedded with the tiny tower) through the command line serves most tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_trainer import COLOURS, TINY, make_source

ZS, RET = "colours-held-out", "captions-of-held-out-pairs"  # long names: the legend must still fit
STEPS = 30


def _train(run_dir: Path, *sets: str, **popen):
    args = [sys.executable, "-m", "littune", "train", "--run-dir", str(run_dir)]
    for o in TINY + list(sets):
        args += ["--set", o]
    return subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Training data, two validation caches, and the settings that name them."""
    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower
    from littune.towers.tiny import SPEC

    root = tmp_path_factory.mktemp("outcome")
    src = make_source(root / "data")
    held_out = make_source(root / "val", per_class=1)
    for name, rgb in COLOURS.items():
        (root / "zs" / name).mkdir(parents=True)
        for k in range(2):
            arr = np.full((40, 40, 3), 128, np.uint8)
            arr[8 + k:32, 8:32] = rgb
            Image.fromarray(arr).save(root / "zs" / name / f"{k}.png")
    tower = build_image_tower(SPEC).eval()
    embed_source(open_source(str(held_out)), tower, root / "val-cache", progress=False, workers=0)
    embed_source(open_source(str(root / "zs")), tower, root / "zs-cache", progress=False, workers=0)
    sets = (f"data.source={src}", f"data.cache={root / 'cache'}", f"steps={STEPS}",
            f"val.zeroshot=[{{name: {ZS}, cache: {root / 'zs-cache'}}}]",
            f"val.retrieval=[{{name: {RET}, cache: {root / 'val-cache'}}}]")
    return root, sets


@pytest.fixture(scope="module")
def finished(world):
    """(run directory, stdout, stderr) of a finished run."""
    root, sets = world
    proc = _train(root / "run", *sets)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root / "run", out, err


def test_train_prints_the_final_validation_results_as_a_table(finished):
    run_dir, out, _ = finished
    results = json.loads((run_dir / "results.json").read_text())
    lines = _lines(out)
    assert lines[-1] == f"model written to {run_dir / 'model'}"
    head = lines.index(f"final validation (every metric in {run_dir / 'results.json'}):")
    table = lines[head + 1:head + 4]
    columns = ["zero-shot top-1", "zero-shot top-5", "text→image R@1", "text→image R@5", "image→text R@1",
               "image→text R@5"]
    assert table[0].split("  ")[0] == "validation set"
    assert [c.strip() for c in table[0].split("  ") if c.strip()][1:] == columns
    keys = ["acc1", "acc5", "image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
            "text_retrieval_recall@5"]
    for row, name in zip(table[1:], (ZS, RET)):
        cells = row.split()
        assert cells[0] == name
        assert cells[1:] == [f"{results[name][k]:.3f}" if k in results[name] else "-" for k in keys], row
    assert all(len(ln) == len(table[0]) for ln in table)  # aligned
