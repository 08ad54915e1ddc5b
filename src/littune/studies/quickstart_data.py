"""The main job's data: emoji captioned in every emojibase language and Openclipart drawings with
all their text signals, mixed into one training source; their caches; held-out near-duplicates out.

* **Emoji** (``littune data emoji --langs all``): the held-out splits of :mod:`littune.studies.benchmark`,
  captions in English and every other emojibase locale, each with its language (``lang`` column).
* **Openclipart** (``littune data openclipart``): public-domain drawings, captioned from their
  titles, keywords and descriptions (its own language metadata does not exist: ``lang`` is empty);
  split by title, so its test drawings and captions are never trained on.
* **The mix** ``train-mix.csv``: every training row of both, image paths relative to it. Training
  samples one caption per image per step under ``data.language_share`` (see
  :mod:`littune.train.sampling`), so an image's title, keywords, description and every language
  of its name are all used, jointly.
* **Caches**: the locked tower over the mix, the three emoji splits and the Openclipart test set.
* **Dedup** (``littune dedup``): training images whose features are near duplicates (cosine >=
  :data:`DEDUP_THRESHOLD`) of any evaluation image are listed in ``dedup.tsv``, and training excludes
  them (``data.exclude``).
"""

from __future__ import annotations

import csv
import io
import multiprocessing as mp
from contextlib import contextmanager
from pathlib import Path

from . import benchmark as bench
from ..errors import LittuneError
from ..fileio import atomic_write

#: cosine of locked features at or above which a training image counts as a copy of an evaluation
#: image. Lite0 puts distinct emoji of one design (two clock faces, mirrored fists) at 0.97-0.985;
#: at 0.99 what is left is the same art filed under two concepts (or two sets repackaging it).
DEDUP_THRESHOLD = 0.99
QUICK_CLIPS = 600  # usable Openclipart drawings in the quick build


def write_mix(path: Path, parts: list[Path]) -> int:
    """``image,caption,lang`` rows of every CSV in ``parts``, image paths made relative to ``path``'s
    folder (a CSV without a ``lang`` column gives its rows an empty language); returns the row count.
    The file is rewritten only when its bytes change, so its caches stay valid on a rerun."""
    buf, n = io.StringIO(), 0
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption", "lang"])
    for part in parts:
        rel = Path(part).parent.resolve().relative_to(path.parent.resolve())
        moved: dict[str, str] = {}  # each image once: its captions are a row each
        with open(part, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                image = moved.get(row["image"]) or moved.setdefault(row["image"], (rel / row["image"]).as_posix())
                w.writerow([image, row["caption"], row.get("lang", "")])
                n += 1
    if not path.is_file() or path.read_text(encoding="utf-8") != buf.getvalue():
        atomic_write(path, buf.getvalue())
    return n


def dedup(train: Path, evals: list[Path], out: Path) -> tuple[Path, int]:
    """``littune dedup TRAIN --against EVAL... --threshold DEDUP_THRESHOLD --out out``: the list and its count."""
    from ..cache import EmbeddingCache
    from ..data.dedup import near_duplicates, write_list

    found = near_duplicates(EmbeddingCache.open(train), [EmbeddingCache.open(e) for e in evals], DEDUP_THRESHOLD)
    fresh = write_list(out.with_name(out.name + ".new"), found)
    if out.is_file() and out.read_bytes() == fresh.read_bytes():
        fresh.unlink()  # the same list: keep the file (and its time stamp) of the earlier run
    else:
        fresh.replace(out)
    bench.say(f"dedup: littune dedup {train} --against {len(evals)} evaluation caches --threshold {DEDUP_THRESHOLD}: "
              f"{len(found)} training images are near duplicates of evaluation images; training excludes them")
    return out, len(found)


@contextmanager
def _beside(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a second process while the body runs; yields a :class:`_Beside`
    whose ``result()`` waits for it (and raises its error). Each build has stretches on one core
    (reading, captions, tables) that the other's rendering fills: on 2 cores the emoji and
    Openclipart builds take less time side by side than one after the other. Its log is dropped
    (its result says what it built); if the body fails, the second process is stopped."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_send_result, args=(send, fn, args, {**kwargs, "log": _quiet}), name=fn.__name__)
    proc.start()
    send.close()
    other = _Beside(receive, proc)
    try:
        yield other
        other.result()
    finally:
        if proc.is_alive() and not other.done:
            proc.terminate()
        proc.join()


class _Beside:
    """The second process of :func:`_beside`: ``result()`` is its return value, or raises its error."""

    def __init__(self, receive, proc):
        self.receive, self.proc, self.done, self._got = receive, proc, False, None

    def result(self):
        if not self.done:
            try:
                self._got = self.receive.recv()
            except EOFError:
                self.proc.join()
                self._got = ("error", LittuneError(f"{self.proc.name} stopped with exit code {self.proc.exitcode} "
                                                   "before it finished"))
            self.done = True
        kind, value = self._got
        if kind == "error":
            raise value
        return value


def _send_result(send, fn, args, kwargs) -> None:
    try:
        send.send(("ok", fn(*args, **kwargs)))
    except BaseException as e:  # the parent raises it
        send.send(("error", e))
    finally:
        send.close()


def _quiet(msg: str) -> None:
    """A log that drops its lines."""


def prepare_mix(out: Path, quick: bool, tower: str | dict = "efficientnet-lite0", progress: bool = True,
                clipart: dict | None = None, **emoji_options) -> dict:
    """Build (or reuse) both datasets, the mix, every cache and the dedup list; return their paths:
    :func:`littune.studies.benchmark.prepare`'s dict plus ``source`` (the mix), ``exclude`` (the list),
    ``duplicates`` (its count), ``languages`` and ``clipart`` (``{"data", "cache"}`` of its test set).
    ``clipart``: options of :func:`littune.builders.openclipart.build_openclipart` (tests pass a
    small ``source``)."""
    from ..builders.emoji import build_emoji
    from ..builders.openclipart import build_openclipart

    root = out / "data"
    emoji_dir = root / ("emoji-all-langs-quick" if quick else "emoji-all-langs")
    clip_dir = root / ("openclipart-quick" if quick else "openclipart")
    bench.say(f"data: littune data openclipart --out {clip_dir}" + (f" --limit {QUICK_CLIPS}" if quick else "")
              + " (in a second process, beside the emoji)")
    bench.say(f"data: littune data emoji --langs all --out {emoji_dir}"
              + (f" --limit-concepts {bench.QUICK_CONCEPTS}" if quick else ""))
    clip_opts = {"limit": QUICK_CLIPS if quick else None, "progress": False, **(clipart or {})}
    mix = root / f"train-mix{'-quick' if quick else ''}.csv"
    tag = bench.tower_tag(tower)
    caches = out / "caches" / f"{mix.stem}-{tag}"
    with _beside(build_openclipart, clip_dir, **clip_opts) as clip_build:
        manifest = build_emoji(emoji_dir, limit_concepts=bench.QUICK_CONCEPTS if quick else None, langs=["all"],
                               **emoji_options)
        # The emoji evaluation sets embed while the drawings finish in the other process (its last
        # stretch runs on one core).
        net = bench.embed_missing([(emoji_dir / "eval" / f"retrieval_{s}.csv", caches / s) for s in bench.SPLITS
                                   if (emoji_dir / "eval" / f"retrieval_{s}.csv").is_file()], tower, tag, progress)
    clip_counts = clip_build.result()["counts"]
    write_mix(mix, [emoji_dir / "train.csv", clip_dir / "train.csv"])
    bench.embed_missing([(mix, caches / "train"), (clip_dir / "retrieval_test.csv", caches / "openclipart_test")],
                        tower, tag, progress, net=net)
    evals = {s: {"cache": caches / s, "classnames": emoji_dir / "eval" / s / "classnames.txt"}
             for s in bench.SPLITS if (emoji_dir / "eval" / f"retrieval_{s}.csv").is_file()}
    exclude, n_dup = dedup(caches / "train", [caches / "openclipart_test", *(v["cache"] for v in evals.values())],
                           caches / "dedup.tsv")
    return {"data": emoji_dir, "manifest": manifest, "train": caches / "train", "eval": evals, "source": mix,
            "exclude": exclude, "duplicates": n_dup, "languages": ["en", *manifest["langs"]],
            "clipart": {"data": clip_dir, "cache": caches / "openclipart_test", "train_images": clip_counts["train_images"],
                        "test_images": clip_counts["test_images"], "retrieval_images": clip_counts["retrieval_test_rows"]}}
