"""Images on disk found by walking: a folder with sidecar caption files, or a COCO captions JSON
whose images sit in a folder next to it (or under ``image_root``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from ..errors import LittuneError
from .base import RecordGrouper, Source, clean_captions, file_digest, resolve_path
from .decode import IMAGE_EXTENSIONS
from .records import Record


class FolderSource(Source):
    """A folder (searched recursively, in sorted relative-path order, hidden entries ignored) of
    images with optional sidecar captions: ``name.txt`` or ``name.jpg.txt``, one caption per line.
    Images with no sidecar get no captions (an unlabeled set, fine for ``littune index``)."""

    type = "folder"

    def _load(self) -> list[Record]:
        root = Path(self.path)
        records = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            names = set(filenames)
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, name)
                caps: list[str] = []
                for side in (name + ".txt", os.path.splitext(name)[0] + ".txt"):
                    if side in names:
                        caps = _read_caption_file(os.path.join(dirpath, side), self)
                        break
                rel = Path(full).relative_to(root).as_posix()
                records.append(Record(key=rel, captions=caps, path=full))
        return sorted(records, key=lambda r: r.key)


def _read_caption_file(path: str, source: Source) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return clean_captions(f.read().splitlines())
    except UnicodeDecodeError:
        source._problem(path, "caption file is not UTF-8 text")
        return []


class COCOSource(Source):
    """COCO captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``caption``). Option ``image_root``; by default the images are looked for next to
    the file, in ``<split>/`` or ``../<split>/`` (``captions_val2017.json`` -> ``val2017``)."""

    type = "coco"

    def _load(self) -> list[Record]:
        path = self.path
        try:
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LittuneError(f"source not found: {path}") from None
        except json.JSONDecodeError as e:
            raise LittuneError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or "images" not in data:
            raise LittuneError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
        images = data["images"]
        by_id: dict[Any, list[str]] = {}
        for a in data.get("annotations", []):
            if "image_id" not in a:
                raise LittuneError(f"{path}: annotation without image_id: {str(a)[:100]}")
            by_id.setdefault(a["image_id"], []).append(a.get("caption", ""))
        root = self._image_root(images)
        group = RecordGrouper()
        for i, im in enumerate(images):
            name = im.get("file_name")
            if not name:
                self._problem(f"{path}:images[{i}]", "image entry without file_name")
                continue
            group.add(name, clean_captions(by_id.get(im.get("id"), [])), path=resolve_path(root, name))
        known = {im.get("id") for im in images}
        orphans = [k for k in by_id if k not in known]
        for k in orphans:
            self._problem(f"{path}:image_id={k}", "captions for an image_id not in 'images'")
        return group.records()

    def _image_root(self, images: list[dict]) -> Path:
        if self.options.get("image_root"):
            return Path(self.options["image_root"])
        here = Path(self.path).parent
        m = re.match(r"(?:captions|image_info)_(.+)\.json$", Path(self.path).name)
        candidates = [here]
        if m:
            candidates += [here / m.group(1), here.parent / m.group(1)]
        candidates += [here / "images", here.parent / "images", here.parent]
        probe = next((im.get("file_name") for im in images if im.get("file_name")), None)
        if probe:
            for c in candidates:
                if (c / probe).exists():
                    return c
        return here

    def _content(self) -> Iterator[bytes]:
        yield file_digest(self.path)

