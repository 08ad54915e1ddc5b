"""How `littune train` ends, as a user sees it: the final validation results as a table with each retrieval
direction named; a finished run re-run says so in one line and writes nothing; Ctrl-C says where it
stopped once, on a line of its own below the progress bar; the plots are not cut at their edges.

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


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # the run directory's lock names whoever holds it now


def test_a_finished_run_run_again_says_so_and_writes_nothing(world, finished):
    root, sets = world
    run_dir = finished[0]
    before = _snapshot(run_dir)
    proc = _train(run_dir, *sets, "progress=true")  # a change that changes nothing computed
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert _lines(err) == [f"littune train: run {run_dir} finished at step {STEPS}; its model is {run_dir / 'model'}: "
                           "nothing to do; delete it or give another --run-dir to train again"]
    assert out == ""
    assert _snapshot(run_dir) == before  # model/, checkpoints, config.yaml, metrics: untouched


def test_what_counts_as_finished(world, finished, tmp_path):
    """More steps, another setting, a val section without results, or a model/ older than the last
    checkpoint (its export did not finish) are not a finished run."""
    from littune.config import load_config
    from littune.train.run_outcome import finished_step

    root, sets = world
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)  # copytree keeps the times

    def cfg(*more):
        return load_config(overrides=TINY + list(sets) + [f"run_dir={run_dir}", *more])

    assert finished_step(run_dir, cfg()) == STEPS
    assert finished_step(run_dir, cfg("log_every=5", "keep_checkpoints=1")) == STEPS
    assert finished_step(run_dir, cfg("steps=40")) is None  # trains on from step 30
    assert finished_step(run_dir, cfg("optim.lr=1e-3")) is None  # refused by the resume check instead
    assert finished_step(run_dir, cfg(f"val.zeroshot=[{{name: other, cache: {root / 'zs-cache'}}}]")) is None
    (run_dir / "results.json").unlink()
    assert finished_step(run_dir, cfg()) is None
    shutil.copy2(finished[0] / "results.json", run_dir / "results.json")
    state = next((run_dir / "checkpoints").iterdir()) / "state.json"
    later = (run_dir / "model" / "config.json").stat().st_mtime + 5
    os.utime(state, (later, later))
    assert finished_step(run_dir, cfg()) is None


def test_ctrl_c_says_where_it_stopped_once_on_its_own_line(world, tmp_path):
    root, sets = world
    run_dir = tmp_path / "run"
    proc = _train(run_dir, *sets, "steps=100000", "progress=true", "checkpoint_every=0")
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    said = [ln for ln in err.split("\n") if "interrupted" in ln]
    assert len(said) == 1, err
    step = int(said[0].split("at step ")[1].split(";")[0])
    assert said[0] == (f"littune train: interrupted: checkpoint written at step {step}; run the same command "
                       "again to resume"), repr(said[0])  # not after the bar's text on the bar's line
    assert "train Lu:" in err  # the bar was drawn
    assert (run_dir / "checkpoints" / f"step_{step:07d}" / "state.json").is_file()
    assert "Traceback" not in err


def _touches_edge(png: Path) -> list[str]:
    """The edges of the image with a pixel that is not the white background (something cut there)."""
    with Image.open(png) as im:
        a = np.asarray(im.convert("L"))
    edges = {"top": a[:2], "bottom": a[-2:], "left": a[:, :2], "right": a[:, -2:]}
    return [name for name, px in edges.items() if (px < 250).any()]


def test_the_plots_are_not_cut_at_their_edges(finished):
    """The training plot's panel titles and legend and the validation plot's legend (long set names beside
    the axes) are inside the image: a white margin all round."""
    run_dir = finished[0]
    for name in ("training.png", "validation.png"):
        png = run_dir / "plots" / name
        assert png.is_file()
        assert _touches_edge(png) == [], f"{name}: something is cut at its edges"
