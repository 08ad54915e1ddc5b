"""One image, one embedding: a run copies the rows earlier caches hold for its files instead of computing them.

Before :func:`~littune.cache.embed_source` decodes anything, :func:`start` looks up every image of the
shards still to do in the feature index (:mod:`.registry`): the same file (resolved path, size, mtime,
inode), unchanged, under the same computation (tower fingerprint, pre-processing, runtime and device,
pixel limit; stored as the same dtype or float32; with ``views`` augmented views, the same seed and image
key, since a view's random crop depends on the key). What it finds is neither decoded nor run through the
tower: the writer copies those rows (:meth:`RunReuse.rows`) in among the computed ones, in source order,
so a cache made with reuse holds what a fresh run writes and stays complete on its own. Every shard a run
writes is entered in the index (:meth:`RunReuse.written`), so the next source that names the same files
finds them.

A shard's decision (which of its images are copied, from which file and row) is written before any
image is decoded (``shards/NNNNN.reuse`` when it copies any, and ``shards/decided-RANK.reuse`` naming the
shards decided; all removed once the cache is complete): a run killed and resumed follows it, so it writes
the bytes an uninterrupted run writes, whatever the index learnt in between. With onnxruntime (the CPU
default) a row does not depend on the batch it was computed in, so a reused row is the bytes a fresh run
computes; with torch a row keeps the last bits of the batch it was first computed in (as two fresh caches
of one image in other batches differ).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import groupby
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.decode import DEFAULT_MAX_PIXELS
from ..fileio import atomic_write
from .format import FINGERPRINT_SCHEME, SHARD_DIR
from .registry import FeatureIndex, Found, Rows, computation_key, eval_decode, file_identity
from .tokens import KEY as TOKENS_KEY, plan_fields, resolve

#: a shard's decision (the rows it copies, from which files), when it copies any
DECISION = "{:05d}.reuse"
#: the shards a rank has decided (those without a decision file copy nothing)
DECIDED = "decided-{}.reuse"


@dataclass
class Report:
    """What a run embedded and what it reused, and from which caches."""

    embedded: int = 0
    reused: int = 0
    sources: Counter = field(default_factory=Counter)

    def add(self, other: "Report") -> None:
        self.embedded += other.embedded
        self.reused += other.reused
        self.sources.update(other.sources)

    def line(self) -> str | None:
        """``embedded 10 new images, reused 950 from CACHE`` (None when nothing was reused)."""
        if not self.reused:
            return None
        where = f"from {next(iter(self.sources))}" if len(self.sources) == 1 else (
            "(" + ", ".join(f"{n:,} from {d}" for d, n in self.sources.most_common()) + ")")
        s = "" if self.embedded == 1 else "s"
        return f"embedded {self.embedded:,} new image{s}, reused {self.reused:,} {where}"


class RunReuse:
    """One run's decisions (:meth:`skip`, :meth:`rows`) and its entries in the index (:meth:`written`).

    Memory stays small per image: 17 bytes of file identity and, for a copied image, its offset; the rows
    to copy are read back from the shard's decision file when the shard is written."""

    def __init__(self, out: Path, plan: dict, phash: str, comp: str, index: FeatureIndex, records,
                 spans: list[tuple]):
        self.out, self.plan, self.phash, self.comp, self.index = out, plan, phash, comp, index
        self.records = records
        self.views, self.dim = int(plan["views"]), int(plan["dim"])
        self.source = Rows(self.dim, tokens=plan.get("tokens"))
        self.skips: dict[int, np.ndarray] = {}  # shard -> offsets (within the shard) of the copied images
        self.report = Report()
        now = time.time()  # every file is looked at before any is decoded
        self.idents = {lo: _identities(records, lo, hi, now) for _, lo, hi in spans}

    def identity(self, lo: int, offset: int) -> bytes | None:
        ids, ok = self.idents[lo]
        return ids[offset].tobytes() if ok[offset] else None

    def skip(self, shard: int) -> frozenset:
        """Offsets (within the shard) of the images whose rows are copied."""
        return frozenset(self.skips.get(shard, np.zeros(0, np.int64)).tolist())

    def _copied(self, shard: int) -> dict[int, Found]:
        if not len(self.skips.get(shard, ())):
            return {}
        decided = _decision(self.out, shard, self.phash)
        return {o: decided[o] for o in self.skips[shard].tolist()}

    def rows(self, shard: int, offsets: list[int]) -> np.ndarray:
        """The copied rows of ``shard`` at ``offsets``, float32 ``(n, 1 + views, dim)``."""
        copied = self._copied(shard)
        return self.source.read([copied[o] for o in offsets], self.views)

    def token_rows(self, shard: int, offsets: list[int]) -> np.ndarray:
        """The tokens of the copied rows of ``shard`` at ``offsets``, float32 ``(n, h*w, F)`` (a token cache)."""
        copied = self._copied(shard)
        return self.source.token_rows([copied[o] for o in offsets])

    def decide(self, shard: int, decided: dict[int, Found], write: bool) -> None:
        """Copy the rows ``decided`` (offset -> row) into ``shard``; ``write``: pin the decision on disk."""
        if write and decided:
            _write_decision(self.out, shard, self.phash, decided)
        elif write:  # copies nothing: a decision an earlier run left for the shard is not this one
            (self.out / SHARD_DIR / DECISION.format(shard)).unlink(missing_ok=True)
        self.skips[shard] = np.asarray(sorted(decided), dtype=np.int64)

    def written(self, shard: int, meta: dict, lo: int) -> None:
        """Shard ``shard`` (first record ``lo``) is on disk: enter its rows, drop its decision, count it."""
        good = meta["good"]
        copied = self._copied(shard)
        rows = [(ident, self.records[lo + g].key, j) for j, g in enumerate(good)
                if (ident := self.identity(lo, g)) is not None]
        if rows:  # a token shard is entered with both files' sha256 (see registry.Rows)
            digest = meta["sha256"] + (f"+{meta['tokens']['sha256']}" if meta.get("tokens") else "")
            self.index.enter(self.comp, self.out / SHARD_DIR / f"{shard:05d}.npy", digest, self.plan["dtype"],
                             self.views, self.dim, self.plan["seed"], rows)
        (self.out / SHARD_DIR / DECISION.format(shard)).unlink(missing_ok=True)
        self.report.add(Report(len(good) - len(copied), len(copied), Counter(f.cache for f in copied.values())))

    def close(self) -> None:
        self.source.close()


def _identities(records, lo: int, hi: int, now: float) -> tuple[np.ndarray, np.ndarray]:
    """The file identities of records ``lo:hi``: ``(n, 16)`` bytes and whether each has one."""
    ids, ok = np.zeros((hi - lo, 16), dtype=np.uint8), np.zeros(hi - lo, dtype=bool)
    for o in range(hi - lo):
        ident = file_identity(records[lo + o], now)
        if ident is not None:
            ids[o], ok[o] = np.frombuffer(ident, dtype=np.uint8), True
    return ids, ok


def start(out: Path, records, spans: list[tuple[int, int, int]], plan: dict, phash: str, preprocess,
          runtime: str, look: bool = True, rank: int = 0, index: FeatureIndex | None = None) -> RunReuse:
    """Decide, for the shards ``spans`` (``(shard, lo, hi)``), which images are copied: a shard an interrupted
    run of this plan decided keeps its decision (the rows whose file is still sound), the others are looked up
    (``look``; else nothing is copied). The decisions are pinned on disk before any image is decoded.
    ``runtime``: what computes the features, ``name/device`` (``onnxruntime/cpu``)."""
    comp = computation_key(tower_fingerprint=plan["tower_fingerprint"], scheme=plan.get("fingerprint_scheme", 1),
                           preprocess=plan["preprocess"], dim=plan["dim"], max_pixels=plan["max_pixels"],
                           decode=eval_decode(preprocess, int(plan["views"])), runtime=runtime,
                           tokens=plan.get("tokens"))
    run = RunReuse(out, plan, phash, comp, index or FeatureIndex(), records, spans)
    decided = _decided(out, phash) if look else set()
    new = []
    for s, lo, hi in spans:
        if s in decided:  # an interrupted run's decision: the rows whose file is still sound are copied
            run.decide(s, {o: f for o, f in _decision(out, s, phash).items() if run.source.check(f)}, write=False)
        else:
            new.append((s, lo, hi))
    _look_up(run, new, look)
    # last: a shard named here and without a decision file copies nothing
    atomic_write(out / SHARD_DIR / DECIDED.format(rank), json.dumps({"plan": phash, "shards": sorted(
        decided | {s for s, _, _ in spans})}), durable=False)
    return run


def _look_up(run: RunReuse, spans: list[tuple], look: bool) -> None:
    """Decide and pin the shards ``spans``, one at a time: copy the rows the index holds a sound one of
    (with ``look``; else none)."""
    def wants():
        for s, lo, _ in spans:
            for o in np.flatnonzero(run.idents[lo][1]).tolist():
                yield s, o, run.identity(lo, o), run.records[lo + o].key

    plan = run.plan
    answers = run.index.lookup(run.comp, ((ident, key) for _, _, ident, key in wants()), run.dim, plan["dtype"],
                               run.views, plan["seed"]) if look else ()
    gone: set[tuple[str, str]] = set()
    for s, group in groupby(zip(wants(), answers), key=lambda item: item[0][0]):
        decided: dict[int, Found] = {}
        for (_, o, _, _), candidates in group:
            for f in candidates:
                if run.source.check(f):
                    decided[o] = f
                    break
                gone.add((f.path, f.sha256))
        run.decide(s, decided, write=True)
    for s, _, _ in spans:
        if s not in run.skips:  # no image of the shard has a file identity, or nothing was looked up
            run.decide(s, {}, write=True)
    run.index.forget(sorted(gone))


def _decided(out: Path, phash: str) -> set[int]:
    """The shards that runs of this plan decided (every rank's list)."""
    shards: set[int] = set()
    for p in (out / SHARD_DIR).glob(DECIDED.format("*")):
        try:
            d = json.loads(p.read_text())
            if d.get("plan") == phash:
                shards.update(int(s) for s in d["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return shards


def _decision(out: Path, shard: int, phash: str) -> dict[int, Found]:
    """The rows a run of this plan decided to copy into ``shard`` (none: no decision file, or not this plan's)."""
    try:
        d = json.loads((out / SHARD_DIR / DECISION.format(shard)).read_text())
        if d.get("plan") != phash or d.get("shard") != shard:
            return {}
        sources = [(str(p), str(h)) for p, h in d["sources"]]
        return {int(o): Found(*sources[int(k)], int(r)) for o, k, r in d["rows"]}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _write_decision(out: Path, shard: int, phash: str, decided: dict[int, Found]) -> None:
    sources: dict[tuple[str, str], int] = {}
    rows = [[o, sources.setdefault((f.path, f.sha256), len(sources)), f.row] for o, f in sorted(decided.items())]
    text = json.dumps({"plan": phash, "shard": shard, "sources": [list(k) for k in sources], "rows": rows})
    # not fsync'ed: a decision lost with the page cache (a crash of the machine) is made again on resume
    atomic_write(out / SHARD_DIR / DECISION.format(shard), text, durable=False)


def remove_decisions(out: Path) -> None:
    """The decisions, once every shard is written (those of shards written just before a kill remain)."""
    for p in (out / SHARD_DIR).glob("*.reuse"):
        p.unlink(missing_ok=True)


class Reused:
    """The images of a list (records or paths) whose eval-view features a cache holds: :attr:`indices` (in
    order), their features read batch by batch (:meth:`features`), what is left to embed (:attr:`rest`)."""

    def __init__(self, n: int, indices: list[int], found: list[Found], rows: Rows):
        self.indices, self._found, self._rows = indices, found, rows
        self.step = 4096 if rows.tokens is None else 256  # rows a :meth:`head_rows` call reads at most, for memory
        held = set(indices)
        self.rest = [i for i in range(n) if i not in held]
        self.report = Report(0, len(found), Counter(f.cache for f in found))

    def features(self, lo: int, hi: int) -> np.ndarray:
        """Features ``(hi - lo, dim)`` float32 of ``indices[lo:hi]``."""
        return self._rows.read(self._found[lo:hi], 0)[:, 0]

    def head_rows(self, lo: int, hi: int) -> np.ndarray:
        """What an image head reads of ``indices[lo:hi]``: their tokens ``(hi - lo, h*w, F)`` float32 (found with
        ``tokens``), else their features."""
        return self.features(lo, hi) if self._rows.tokens is None else self._rows.token_rows(self._found[lo:hi])

    def close(self) -> None:
        self._rows.close()


def find_reused(tower, runtime: str, items, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                index: FeatureIndex | None = None, tokens=None) -> Reused:
    """The eval-view features that caches hold for ``items`` (records or paths), computed by ``tower`` on
    ``runtime`` (``name/device``) from the same files, decoded as :func:`~littune.data.decode.load_image`
    does; stored as float16 or float32 (evaluation with ``--cache`` reads them the same way). ``tokens`` (the
    request ``embed_source`` takes: True or a grid): the rows of token caches of that grid, with their tokens
    (:meth:`Reused.head_rows`), which the attention image head reads."""
    spec = plan_fields(resolve(tower, tokens)).get(TOKENS_KEY)
    comp = computation_key(tower_fingerprint=tower.fingerprint(), scheme=FINGERPRINT_SCHEME,
                           preprocess=tower.preprocess.to_dict(), dim=tower.dim, max_pixels=max_pixels,
                           decode=eval_decode(tower.preprocess, 0), runtime=runtime, tokens=spec)
    index = index or FeatureIndex()
    rows = Rows(int(tower.dim), tokens=spec)
    now = time.time()
    wants = [(i, ident) for i, item in enumerate(items) if (ident := file_identity(item, now)) is not None]
    indices, found, gone = [], [], set()
    for (i, _), candidates in zip(wants, index.lookup(comp, ((ident, "") for _, ident in wants), int(tower.dim),
                                                       "float16", 0, 0)):
        for f in candidates:
            if rows.check(f):
                indices.append(i)
                found.append(f)
                break
            gone.add((f.path, f.sha256))
    index.forget(sorted(gone))
    return Reused(len(items), indices, found, rows)
