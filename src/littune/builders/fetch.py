"""Fetching the builders' raw material once into a cache folder, without root.

The cache is ``$LITTUNE_CACHE`` or ``~/.cache/littune`` (:func:`cache_dir`). npm packages are
fetched with one ``npm pack`` call and unpacked under ``<cache>/npm/<package name>/``, the same
layout as a ``node_modules`` folder (:func:`fetch_npm`); Debian packages with ``apt-get download``
+ ``dpkg-deb -x`` under ``<cache>/deb/<package>/`` (:func:`fetch_deb`). Both unpack into a
temporary folder and rename it into place, so a package folder is whole or absent; a second run
finds it there and downloads nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import LittuneError
from ..fileio import cache_home
from .output import read_json


def cache_dir(override: str | Path | None = None) -> Path:
    """The download cache: ``override``, else ``$LITTUNE_CACHE``, else ``~/.cache/littune``
    (:func:`littune.fileio.cache_home`, which exported towers share)."""
    return cache_home(override)


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



def read_package_json(path: Path):
    """A JSON file of a fetched package; a one-line error when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LittuneError(f"{path}: missing") from None
    except ValueError as e:
        raise LittuneError(f"{path}: not valid JSON ({e})") from None
