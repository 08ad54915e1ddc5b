"""A built dataset's folder and the files in it.

A builder writes only into an empty folder or one it built before (:func:`prepare_out`, which
leaves a ``.littune-dataset.json`` stamp). Every file goes through :mod:`littune.fileio`, so none is
ever half-written: CSV tables with an ``image,caption`` header and paths relative to the CSV
(:func:`write_csv`), the ``skipped.tsv`` report, JSON manifests, and optional WebDataset tar shards
(``key.png`` + ``key.json`` with the captions) with fixed tar headers, so the bytes are reproducible
(:func:`write_wds`); evaluation folders hard-link the rendered PNGs (:func:`link_or_copy`). A builder notes each item it leaves out as ``(where, message)``; a message
reads ``"reason: detail"`` or ``"reason (detail)"`` and becomes one ``where, reason, detail`` row of
``skipped.tsv`` (:func:`skipped_rows`); the datacard counts the rows by reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import LittuneError
from ..fileio import atomic_write, write_json, write_skipped

STAMP = ".littune-dataset.json"
FORMATS = ("csv", "wds")


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
    atomic_write(stamp, json.dumps({"builder": builder}) + "\n")
    return out


def check_formats(formats: Sequence[str]) -> list[str]:
    """The output formats asked for (``csv``, ``wds`` or both), duplicates removed."""
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise LittuneError(f"--format: unknown {', '.join(bad) or '(none)'}; use csv, wds or both")
    return formats


def read_json(path: Path) -> dict:
    """A JSON stamp's contents; ``{}`` when it is absent or unreadable (then it is simply redone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_csv(path: str | Path, rows: Iterable[Sequence[str]], header: Sequence[str] = ("image", "caption")) -> int:
    """Write a CSV (UTF-8, header first) atomically; return the number of data rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    n = 0
    for row in rows:
        w.writerow(row)
        n += 1
    atomic_write(path, buf.getvalue())
    return n


_REASON_END = re.compile(r"[:;(]")


def reason_and_detail(message: str) -> tuple[str, str]:
    """A skip message as ``(reason, detail)``: ``"duplicate: same bytes as a.svg"`` ->
    ``("duplicate", "same bytes as a.svg")``, ``"not valid XML (line 1)"`` -> ``("not valid XML", "line 1")``."""
    m = _REASON_END.search(message)
    if m is None:
        return message.strip(), ""
    detail = message[m.end():].strip()
    if m.group() == "(" and detail.endswith(")"):
        detail = detail[:-1]
    return message[:m.start()].strip(), detail


def skipped_rows(items: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(where, message)`` notes as ``skipped.tsv`` rows ``(where, reason, detail)``."""
    return [(where, *reason_and_detail(message)) for where, message in items]


def write_report(out: Path, manifest: dict, skipped: Iterable[tuple[str, str]], card) -> list[tuple[str, str, str]]:
    """A build's last files: ``skipped.tsv``, ``manifest.json`` and ``datacard.md`` (``card(manifest, rows)``,
    written last). Returns the ``skipped.tsv`` rows."""
    rows = skipped_rows(skipped)
    write_skipped(out / "skipped.tsv", rows)
    write_json(out / "manifest.json", manifest)
    atomic_write(out / "datacard.md", card(manifest, rows))
    return rows


def reason_counts(rows: Iterable[Sequence[str]]) -> list[tuple[str, int]]:
    """``(reason, count)`` of ``skipped.tsv`` rows, most frequent first (ties in first-seen order)."""
    return sorted(Counter(r[1] for r in rows).items(), key=lambda kv: -kv[1])


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (copy when the file system cannot)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        atomic_write(dst, Path(src).read_bytes())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A small GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


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


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_tar(f, samples: Sequence[tuple[str, Path, dict]]) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, png, meta in samples:
            if "." in key:
                raise ValueError(f"webdataset key {key!r} contains a dot")
            _tar_add(tar, f"{key}.png", Path(png).read_bytes())
            _tar_add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())


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
        atomic_write(folder / name, lambda f, part=samples[start:start + shard_size]: _write_tar(f, part))
        names.append(name)
    return names
