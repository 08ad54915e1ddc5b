"""A search page that needs no server: the text tower runs in the browser, the images were embedded before.

As big_vision's ``lit_demo`` does with precomputed image embeddings, :func:`export_web_demo` writes
a static folder that any plain file server (``python -m http.server -d DIR``) can serve:

* ``text.onnx``, ``tokenizer.json``, ``littune_onnx.json`` -- the text side of ``--format onnx``
  (:mod:`littune.export.onnx`), checked against torch and littune's tokenizer as it is written;
* ``embeddings.f16`` -- the index's ``(N, D)`` L2-normalised image embeddings exactly as the index
  stores them: float16, little-endian, row after row;
* ``littune_web.json`` -- count, dimension, dtype, each row's key (not where the file lives), its
  thumbnail (``null`` if the image no longer opens), the text graph's file and output, the context
  length and truncation side, the text prefix (put before every query by ``tokenizer.json``'s own
  normaliser, which tokenizers.js runs: the page adds nothing), the embedding fingerprint and the
  vendored packages' versions;
* ``thumbs/NNNNNN.jpg`` -- each indexed image decoded again from its source
  (:meth:`~littune.search.SearchIndex.open_image`) and re-encoded, its longer side at most ``thumb`` px;
* ``index.html``, ``app.js``, ``style.css`` -- the page (``littune/export/web_demo``): it tokenizes the
  query with tokenizers.js (Hugging Face's JS port, which reads ``tokenizer.json`` as it is), runs
  ``text.onnx`` with onnxruntime-web's single-threaded wasm backend, ranks the rows by cosine
  (ties to the lower row, as ``littune search``) and shows the top k;
* ``vendor/`` -- the files the page loads from the npm packages ``onnxruntime-web`` (its ESM
  bundle and wasm) and ``@huggingface/tokenizers``, fetched once into littune's cache
  (:func:`littune.builders.fetch.fetch_npm`) or taken from an ``npm install`` folder.

The index must hold this model's image embeddings (:meth:`~littune.search.SearchIndex.check_model`).
The folder is written under a temporary name and renamed into place; an ``out`` that exists is an
error unless ``overwrite`` (which replaces only an earlier web export, or an empty folder).
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import LittuneError
from .onnx import TEXT_NAME, TOKENIZER_NAME, check_out, export_text, export_tokenizer, onnx_record, write_export
from ..fileio import write_json

WEB_FORMAT, WEB_VERSION = "littune-web", 1
WEB_META = "littune_web.json"
EMBEDDINGS_FILE = "embeddings.f16"
THUMBS = "thumbs"
#: the npm packages the page loads, and the files it needs from each
ORT_WEB, TOKENIZERS_JS = "onnxruntime-web@1.30.0", "@huggingface/tokenizers@0.2.0"
VENDOR_FILES = {
    "onnxruntime-web": ["dist/ort.wasm.bundle.min.mjs", "dist/ort-wasm-simd-threaded.wasm"],
    "@huggingface/tokenizers": ["dist/tokenizers.min.mjs", "LICENSE"],
}
PAGE_FILES = ("index.html", "app.js", "style.css")


def vendor_packages(packages: str | Path | None = None, cache: str | Path | None = None, log=print) -> dict[str, Path]:
    """``{name: folder}`` of the page's npm packages: from ``packages`` (an ``npm install`` folder),
    else fetched once into ``<cache>/npm/`` (``$LITTUNE_CACHE`` or ``~/.cache/littune``)."""
    from ..builders.fetch import cache_dir, fetch_npm

    found = fetch_npm([ORT_WEB, TOKENIZERS_JS], cache_dir(cache), packages=packages, log=log)
    for name, files in VENDOR_FILES.items():
        missing = [f for f in files if not (found[name] / f).is_file()]
        if missing:
            raise LittuneError(f"{found[name]}: the npm package {name} lacks {', '.join(missing)} "
                               f"(the page is written for {ORT_WEB} and {TOKENIZERS_JS})")
    return found


def _copy_vendor(found: dict[str, Path], folder: Path) -> dict[str, str]:
    """The page's library files into ``folder/vendor``; returns ``{package: version}``."""
    from ..builders.fetch import package_version

    vendor = folder / "vendor"
    vendor.mkdir()
    versions = {}
    for name, files in VENDOR_FILES.items():
        for f in files:
            dest = vendor / (f"{name.split('/')[-1]}-{Path(f).name}" if f == "LICENSE" else Path(f).name)
            shutil.copyfile(found[name] / f, dest)
        versions[name] = package_version(found[name])
    lines = [f"{n} {v} (npm), license: see its package.json / LICENSE" for n, v in versions.items()]
    (vendor / "NOTICE.txt").write_text("Copied unchanged from the npm packages:\n" + "\n".join(lines) + "\n")
    return versions


def _copy_page(folder: Path) -> None:
    page = resources.files("littune.export") / "web_demo"
    for name in PAGE_FILES:
        (folder / name).write_bytes((page / name).read_bytes())


def write_thumbnails(index, folder: Path, size: int = 128, log=print) -> list[str | None]:
    """``thumbs/NNNNNN.jpg`` for each row (longer side <= ``size``); ``None`` where it no longer opens."""
    from PIL import Image

    from ..data.decode import BadImage

    (folder / THUMBS).mkdir()
    names: list[str | None] = []
    lost = 0
    for i in range(len(index)):
        try:
            img = index.open_image(i)
        except (LittuneError, BadImage, OSError) as e:
            lost += 1
            if lost <= 3:
                log(f"littune: no thumbnail for {index.keys[i]}: {e}")
            names.append(None)
            continue
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        name = f"{THUMBS}/{i:06d}.jpg"
        img.convert("RGB").save(folder / name, format="JPEG", quality=85)
        names.append(name)
    if lost:
        log(f"littune: {lost} of {len(index)} images no longer open; the page shows a blank square for them")
    return names


def web_record(model, index, thumbnails: list[str | None], versions: dict[str, str]) -> dict:
    """What ``littune_web.json`` holds (see the module docstring)."""
    from .. import __version__

    return {
        "format": WEB_FORMAT, "format_version": WEB_VERSION, "littune": __version__,
        "count": len(index), "dim": index.dim, "dtype": "float16", "byte_order": "little",
        "embeddings": EMBEDDINGS_FILE, "keys": list(index.keys), "thumbnails": thumbnails,
        "text": {"file": TEXT_NAME, "tokenizer": TOKENIZER_NAME, "output": "text_embeddings",
                 "context_length": int(model.text_tower.context_length),
                 "truncation_side": model.text_tower.tokenizer.truncation_side,
                 "prefix": model.text_tower.prefix},
        "fingerprint": index.meta.get("model", {}).get("fingerprint"),
        "vendor": versions,
    }


def _write_web_folder(model, index, folder: Path, found: dict[str, Path], thumb: int, log,
                      exporter: str | None = None) -> dict:
    text_err, used = export_text(model, folder / TEXT_NAME, exporter)
    export_tokenizer(model, folder / TOKENIZER_NAME)
    skipped = "the web demo needs the text side only; the images are embedded already"
    write_json(folder / "littune_onnx.json", onnx_record(model, text_err, {"image": None, "image_skipped": skipped},
                                                            used))
    emb = np.asarray(index.embeddings, dtype="<f2")
    (folder / EMBEDDINGS_FILE).write_bytes(np.ascontiguousarray(emb).tobytes())
    thumbnails = write_thumbnails(index, folder, thumb, log)
    versions = _copy_vendor(found, folder)
    _copy_page(folder)
    record = web_record(model, index, thumbnails, versions)
    write_json(folder / WEB_META, record)
    return record


def export_web_demo(model, index, out: str | Path, overwrite: bool = False, packages: str | Path | None = None,
                    cache: str | Path | None = None, thumb: int = 128, log=None, exporter: str | None = None) -> dict:
    """Write the static search page for ``index`` (a :class:`~littune.search.SearchIndex` of
    ``model``'s image embeddings) to the folder ``out``; returns ``littune_web.json``'s record
    (``exporter``: ``text.onnx``'s, as :func:`littune.export.onnx.export_onnx_model` takes it).

    Raises :class:`LittuneError` (one line, nothing written) if ``out`` exists (see ``overwrite``),
    if the index holds another model's embeddings, if the npm packages cannot be had, or if the
    text side does not export."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_out(Path(out), overwrite, WEB_META, "web export")
    index.check_model(model)
    if len(index) == 0:
        raise LittuneError(f"index {index.directory} is empty: nothing to search (nothing was written)")
    found = vendor_packages(packages, cache, log)
    return write_export(model, out, lambda tmp: _write_web_folder(model, index, tmp, found, thumb, log,
                                                                          exporter))
