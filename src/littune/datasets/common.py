"""Plumbing shared by the dataset builders: fetching, splitting, rendering in parallel, writing.

The builders fetch their raw material once into a cache folder (``$LITTUNE_CACHE`` or
``~/.cache/littune``): npm packages with ``npm pack`` (the tarballs are unpacked under
``<cache>/npm/<package name>/``, the same layout as a ``node_modules`` folder) and Debian packages
with ``apt-get download`` + ``dpkg-deb -x`` (under ``<cache>/deb/<package>/``); neither needs root.
A second run finds them there and downloads nothing. Splits come from a seeded hash of each item's
key (:func:`stable_fraction`), so they do not depend on the order files are listed in or on which
other items exist. Pictures are rendered in a process pool (:func:`render_all`), skipping those
already on disk, with a progress bar on stderr. Tables are written atomically: CSV with an
``image,caption`` header and paths relative to the CSV, ``skipped.tsv`` (item, reason), JSON
manifests, and optional WebDataset tar shards (``key.png`` + ``key.json`` with the captions) with
fixed tar headers so the bytes are reproducible.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import LittuneError

STAMP = ".littune-dataset.json"


# -- cache and fetching -------------------------------------------------------------------------
def cache_dir(override: str | Path | None = None) -> Path:
    """The download cache: ``override``, else ``$LITTUNE_CACHE``, else ``~/.cache/littune``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("LITTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "littune"


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"@scope/name@1.2.3"`` -> ``("@scope/name", "1.2.3")``."""
    at = spec.rfind("@")
    if at > 0:
        return spec[:at], spec[at + 1:]
    return spec, None


def package_version(pkg_dir: Path) -> str:
    """The ``version`` field of an unpacked npm package."""
    try:
        return json.loads((Path(pkg_dir) / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError) as e:
        raise LittuneError(f"{pkg_dir}: not an npm package folder (no readable package.json): {e}") from None


def find_npm_package(root: str | Path, name: str) -> Path | None:
    """Look for package ``name`` in ``root`` (a ``node_modules`` folder or a folder holding one)."""
    root = Path(root)
    for base in (root, root / "node_modules"):
        if (base / name / "package.json").is_file():
            return base / name
    return None


def _extract_tgz(tgz: Path, dest: Path) -> None:
    """Unpack an npm tarball's ``package/`` folder into ``dest`` (atomically, no path escapes)."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        inner = tmp / "package"
        if not inner.is_dir():
            dirs = [p for p in tmp.iterdir() if p.is_dir()]
            if len(dirs) != 1:
                raise LittuneError(f"{tgz}: unexpected npm tarball layout")
            inner = dirs[0]
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(inner, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_npm(specs: Sequence[str], cache: Path, packages: str | Path | None = None,
              log=print) -> dict[str, Path]:
    """Make npm packages available locally; return ``{name: unpacked folder}``.

    ``specs`` are ``name@version`` strings. With ``packages`` (a folder from ``npm install``), the
    packages are taken from there and nothing is downloaded. Otherwise each one is looked up in
    ``<cache>/npm/`` and the missing ones (or ones at another version) are fetched with one
    ``npm pack`` call.
    """
    found: dict[str, Path] = {}
    wanted = [_split_spec(s) for s in specs]
    if packages is not None:
        missing = []
        for name, _ in wanted:
            p = find_npm_package(packages, name)
            if p is None:
                missing.append(name)
            else:
                found[name] = p
        if missing:
            raise LittuneError(f"--packages {packages}: missing npm package(s) {', '.join(missing)} "
                               f"(install them with `npm install --prefix DIR {' '.join(missing)}`)")
        return found
    root = cache / "npm"
    todo = []
    for name, version in wanted:
        dest = root / name
        if (dest / "package.json").is_file() and (version is None or package_version(dest) == version):
            found[name] = dest
        else:
            todo.append((name, version))
    if not todo:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise LittuneError("npm not found: install Node.js (it brings npm), or run `npm install` yourself "
                           "and pass the folder with --packages DIR")
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{n}@{v}" if v else n for n, v in todo]
    log(f"fetching {len(names)} npm package(s) into {root}: {' '.join(names)}")
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=root) as tmp:
        proc = subprocess.run([npm, "pack", "--json", "--pack-destination", tmp, *names],
                              capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise LittuneError(f"`npm pack {' '.join(names)}` failed: {err}")
        try:
            packed = json.loads(proc.stdout)
        except ValueError:
            raise LittuneError(f"`npm pack` printed no JSON: {proc.stdout[:200]!r}") from None
        for entry in packed:
            dest = root / entry["name"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            _extract_tgz(Path(tmp) / entry["filename"], dest)
            found[entry["name"]] = dest
    lost = [n for n, _ in todo if n not in found]
    if lost:
        raise LittuneError(f"npm pack did not return {', '.join(lost)}")
    return found


def fetch_deb(package: str, cache: Path, deb_file: str | Path | None = None, log=print) -> Path:
    """Unpack a Debian package into ``<cache>/deb/<package>/`` once; return that folder.

    Downloads with ``apt-get download`` (no root needed) unless ``deb_file`` is given.
    """
    dest = cache / "deb" / package
    done = dest / ".complete"
    if done.is_file():
        stamp = read_json(done)
        if deb_file is None or (stamp.get("deb") == Path(deb_file).name
                                and stamp.get("bytes") == Path(deb_file).stat().st_size):
            return dest
    dpkg = shutil.which("dpkg-deb")
    if dpkg is None:
        raise LittuneError("dpkg-deb not found: this needs a Debian/Ubuntu system, or pass the unpacked "
                           "SVG folder with --source DIR")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{package}-", dir=dest.parent) as tmp:
        tmp = Path(tmp)
        if deb_file is None:
            apt = shutil.which("apt-get")
            if apt is None:
                raise LittuneError(f"apt-get not found: download {package}_*.deb yourself and pass it with --source")
            log(f"fetching {package} with apt-get download into {dest}")
            proc = subprocess.run([apt, "download", package], capture_output=True, text=True, cwd=tmp)
            debs = sorted(tmp.glob(f"{package}_*.deb"))
            if proc.returncode != 0 or not debs:
                err = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise LittuneError(f"`apt-get download {package}` failed: {err}")
            deb = debs[0]
        else:
            deb = Path(deb_file)
            if not deb.is_file():
                raise LittuneError(f"{deb}: no such .deb file")
        proc = subprocess.run([dpkg, "-x", str(deb), str(tmp / "root")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise LittuneError(f"`dpkg-deb -x {deb.name}` failed: {proc.stderr.strip()[-300:]}")
        (tmp / "root" / ".complete").write_text(json.dumps({"deb": deb.name, "bytes": deb.stat().st_size}) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "root", dest)
    return dest


# -- splits ---------------------------------------------------------------------------------------
def stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``(seed, key)``: the basis of every split."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick_fraction(keys: Iterable[str], fraction: float, seed: int, salt: str = "") -> set[str]:
    """The ``round(fraction * n)`` keys with the smallest stable hash (at least 1 if fraction > 0)."""
    keys = sorted(set(keys))
    if fraction <= 0 or not keys:
        return set()
    n = min(len(keys), max(1, round(fraction * len(keys))))
    return set(sorted(keys, key=lambda k: stable_fraction(salt + k, seed))[:n])


# -- output folder --------------------------------------------------------------------------------
def prepare_out(out: str | Path, builder: str) -> Path:
    """Create ``out`` or check it belongs to this builder; never write into someone else's folder."""
    out = Path(out).expanduser()
    stamp = out / STAMP
    if out.exists() and not out.is_dir():
        raise LittuneError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            owner = json.loads(stamp.read_text()).get("builder")
        except (OSError, ValueError):
            owner = None
        if owner != builder:
            what = f"a littune {owner} dataset" if owner else "not a littune dataset folder"
            raise LittuneError(f"--out {out}: folder is not empty and is {what}; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"builder": builder}) + "\n")
    return out


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: Iterable[Sequence[str]], header: Sequence[str] = ("image", "caption")) -> int:
    """Write a CSV (UTF-8, header first) atomically; return the number of data rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    n = 0
    for row in rows:
        w.writerow(row)
        n += 1
    write_text(path, buf.getvalue())
    return n


def write_skipped(path: str | Path, items: Iterable[tuple[str, str]]) -> int:
    """``skipped.tsv``: one ``item<TAB>reason`` line per skipped thing."""
    clean = lambda s: " ".join(str(s).split())  # noqa: E731  (no tabs or newlines inside a field)
    lines = ["item\treason"] + [f"{clean(i)}\t{clean(r)}" for i, r in items]
    write_text(path, "\n".join(lines) + "\n")
    return len(lines) - 1


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (copy when the file system cannot)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A small GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- rendering ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderJob:
    """One picture to draw: an SVG given as text or as a file, and where its PNG goes."""

    key: str
    out: str
    svg: str | None = None
    svg_path: str | None = None
    fonts: bool = False
    crop: bool = False


def _render_one(job: RenderJob, size: int) -> tuple[str, str, str]:
    from .render import RenderError, render_svg, save_png

    try:
        svg = job.svg if job.svg is not None else Path(job.svg_path).read_bytes()
        img, renderer = render_svg(svg, size=size, fonts=job.fonts, crop=job.crop)
        save_png(img, job.out)
        return job.key, "ok", renderer
    except (RenderError, OSError, ValueError) as e:
        return job.key, "error", str(e) or type(e).__name__


def _worker(args):
    return _render_one(*args)


def default_workers() -> int:
    """Worker processes for rendering: the usable CPU cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def job_digest(job: RenderJob, size: int) -> str:
    """What a PNG was drawn from: the SVG bytes and the drawing settings (a changed icon re-renders)."""
    from .render import RENDER_VERSION

    h = hashlib.sha256(f"{RENDER_VERSION}|{size}|{job.fonts}|{job.crop}|".encode())
    h.update(job.svg.encode() if job.svg is not None else Path(job.svg_path).read_bytes())
    return h.hexdigest()[:20]


def render_all(jobs: Sequence[RenderJob], size: int, stamp: Path, workers: int | None = None,
               desc: str = "rendering") -> tuple[dict[str, str], dict[str, str]]:
    """Render every job whose PNG is missing or was drawn from something else, in parallel.

    ``stamp`` (a JSON file) records, for each key, a digest of the SVG and settings its PNG was
    drawn from, so a second run re-renders only what changed. Returns ``(done, failed)``: key ->
    renderer (``"cached"`` for PNGs reused), and key -> error message. Progress goes to stderr.
    """
    from tqdm import tqdm

    from .render import require_renderer

    old = read_json(stamp).get("digests", {})
    digests: dict[str, str] = {}
    done: dict[str, str] = {}
    failed: dict[str, str] = {}
    todo = []
    for j in jobs:
        try:
            digests[j.key] = job_digest(j, size)
        except OSError as e:
            failed[j.key] = f"unreadable ({e.strerror or e})"
            continue
        if os.path.isfile(j.out) and old.get(j.key) == digests[j.key]:
            done[j.key] = "cached"
        else:
            todo.append(j)
    if todo:
        require_renderer()
        workers = default_workers() if workers is None else max(1, int(workers))
        workers = min(workers, max(1, len(todo) // 8))
        args = [(j, size) for j in todo]
        bar = tqdm(total=len(todo), desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                   disable=None, mininterval=0.5)
        pool = None
        try:
            if workers <= 1:
                results = map(_worker, args)
            else:
                import multiprocessing as mp

                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                pool = ctx.Pool(workers)
                results = pool.imap_unordered(_worker, args, chunksize=16)
            for key, status, info in results:
                (done if status == "ok" else failed)[key] = info
                bar.update(1)
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
        finally:
            bar.close()
            if pool is not None:  # interrupted or failed: stop the workers
                pool.terminate()
            # record what is on disk now, also after an interruption
            write_json(stamp, {"size": size, "digests": {k: digests[k] for k in sorted(done)}})
    else:
        write_json(stamp, {"size": size, "digests": {k: digests[k] for k in sorted(done)}})
    return done, failed


def prune_files(folder: Path, keep: set[Path], pattern: str = "*.png") -> int:
    """Delete files under ``folder`` matching ``pattern`` that are not in ``keep`` (stale outputs)."""
    n = 0
    if not folder.is_dir():
        return 0
    keep = {p.resolve() for p in keep}
    for p in folder.rglob(pattern):
        if p.resolve() not in keep:
            p.unlink()
            n += 1
    return n


# -- WebDataset shards ----------------------------------------------------------------------------
def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_wds(folder: Path, prefix: str, samples: Sequence[tuple[str, Path, dict]],
              shard_size: int = 1000) -> list[str]:
    """Write WebDataset shards ``<prefix>-000000.tar``... of ``key.png`` + ``key.json``.

    ``samples`` are ``(key, png_path, json_obj)``; keys must not contain dots. Old shards with the
    same prefix are removed first. Returns the shard file names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}-*.tar"):
        old.unlink()
    names = []
    for start in range(0, len(samples), shard_size):
        name = f"{prefix}-{start // shard_size:06d}.tar"
        tmp = folder / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for key, png, meta in samples[start:start + shard_size]:
                if "." in key:
                    raise ValueError(f"webdataset key {key!r} contains a dot")
                _tar_add(tar, f"{key}.png", Path(png).read_bytes())
                _tar_add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
        os.replace(tmp, folder / name)
        names.append(name)
    return names
