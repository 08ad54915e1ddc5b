"""The package layout: the folders of src/littune are the data flow (docs/guide.md, "How the code is laid out").

* every file that is not Python (the web app's page, the exported page, the template sets) is shipped by a
  ``package-data`` glob of pyproject.toml, and the code finds the pages where they now live;
* every package's ``__init__.py`` says what the stage is (a docstring) and stays light: importing the new
  packages does not import torch, so ``littune --help`` stays fast;
* the public names keep their old import paths (``littune.LiTModel``, ``littune.model.LiTModel``...).
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "littune"
STAGES = ["model", "train", "inference", "export", "serve", "studies"]


def _data_files() -> set[Path]:
    return {p for p in SRC.rglob("*") if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts}


def test_package_data_globs_ship_every_non_python_file():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["littune"]
    shipped = {p for g in globs for p in SRC.glob(g)}
    files = _data_files()
    assert files, "no page or template file found under src/littune"
    missing = sorted(str(p.relative_to(SRC)) for p in files - shipped)
    assert not missing, f"not in pyproject's package-data: {missing}"


def test_every_package_init_has_a_docstring():
    from ast import get_docstring, parse

    bare = [str(p.relative_to(SRC)) for p in sorted(SRC.rglob("__init__.py"))
            if not (get_docstring(parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not bare, f"package without a docstring: {bare}"


def test_stage_packages_import_without_torch():
    code = ("import sys\n" + "".join(f"import littune.{s}\n" for s in STAGES)
            + "import littune.model.settings\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_keep_their_import_paths():
    import littune
    from littune.model import LiTModel, save_trained
    from littune.model.two_towers import LiTModel as defined, save_trained as saver

    assert littune.LiTModel is LiTModel is defined and save_trained is saver
    assert littune.create_model_and_transforms.__module__ == "littune.export.openclip"
    assert littune.parse_setting("Lu").image.locked


def test_pages_are_found_where_they_are_shipped(tmp_path):
    from littune.export.web import PAGE_FILES, _copy_page
    from littune.serve.app import static_dir

    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static_dir().iterdir()}
    _copy_page(tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in PAGE_FILES)
