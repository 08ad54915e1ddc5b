"""The README's "Your data in five commands", run as written on a small captioned folder made here.

The bash block under that heading is read from README.md and each command runs in a shell in a folder
holding what the commands name: ``pairs.csv`` (captioned images), ``val/`` (a class folder),
``val.csv`` (captioned held-out images) and ``photos/`` (images to search). Nothing in the commands is
replaced: the real default towers (EfficientNet-Lite0, multilingual-e5-small) train, evaluate, index,
search and export.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli_eval import COLOURS, SHAPES, _image

pytestmark = pytest.mark.real
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Your data in five commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def make_own_data(root: Path) -> None:
    """pairs.csv, val/<colour>/, val.csv and photos/: coloured shapes, captions naming colour and shape."""
    rng = np.random.default_rng(0)
    rows, val_rows = ["image,caption"], ["image,caption"]
    for d in ("images", "photos"):
        (root / d).mkdir(parents=True)
    for name, rgb in COLOURS.items():
        (root / "val" / name).mkdir(parents=True)
        for shape in SHAPES:
            for k in range(6):
                f = f"images/{name}_{shape}_{k}.png"
                _image(rgb, shape, rng).save(root / f)
                rows += [f"{f},a {name} {shape}", f"{f},{shape} in {name}"]
            _image(rgb, shape, rng).save(root / "val" / name / f"{shape}.png")
            val_rows.append(f"val/{name}/{shape}.png,a {name} {shape}")
            shutil.copy(root / "val" / name / f"{shape}.png", root / "photos" / f"{name}_{shape}.png")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    (root / "val.csv").write_text("\n".join(val_rows) + "\n")


def test_the_readmes_own_data_recipe_runs_as_written_on_a_small_captioned_folder(tmp_path):
    commands = readme_commands()
    assert [c.split()[1] for c in commands if c.startswith("littune")][:3] == ["embed", "train", "eval"]
    make_own_data(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        if " search " in f" {command} ":
            assert "red" in done.stdout.splitlines()[1]  # the best match for "a red bicycle" is red
    assert (tmp_path / "runs" / "mine" / "model" / "config.json").is_file()
    assert {p.name for p in (tmp_path / "mine-onnx").iterdir()} >= {"text.onnx", "image.onnx", "tokenizer.json"}
