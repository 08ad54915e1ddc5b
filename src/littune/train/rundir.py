"""What keeps a run directory whole: one run at a time, no leftovers, a tokenizer that matches its
data, a stop only at a step boundary.

**One run at a time.** Rank 0 holds an exclusive lock on ``RUN_DIR/.lock`` for the whole run, as
``littune embed`` holds one on a cache (:func:`littune.cache.lock.lock`: released by the OS even on
kill -9); a second ``littune train`` into the same folder, however spelled, is refused in one line
that names the first (pid, host, start time).

**Leftovers.** A run killed while it wrote a checkpoint, ``model/`` or a metrics file leaves a
temporary (``checkpoints/.tmp-step_*-PID``, ``.model.tmp-PID``...) or, killed between the two renames
that replace a folder, the old folder moved aside. Once it holds the lock, a run removes the first
and puts the second back (:func:`littune.fileio.clear_leftovers`): no one else writes there.

**The tokenizer.** A text tower trained from scratch has its tokenizer trained on the captions into
``tokenizer/``, beside a record of what it was made from (``littune_tokenizer.json``: the spec's
``tokenizer`` and ``vocab_size``, and a fingerprint of the captions -- their count and SHA-256, in the
order they are read). A run that finds a tokenizer whose record differs (a run killed before its
first checkpoint, then started again with another ``vocab_size`` or other data) trains a new one; with
a checkpoint trained on it, it refuses instead (:func:`ensure_tokenizer`).

**Stopping.** While the trainer's loop runs, Ctrl-C (SIGINT) and SIGTERM only ask it to stop
(:class:`StopSignals`): the step under way completes -- weights, optimiser, schedule, metrics line --
and the loop stops at the boundary after it, writing a checkpoint of exactly that step. A second
signal stops at once, writing nothing (the last checkpoint stays the one to resume from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable

from . import distributed as D
from ..errors import LittuneError
from ..fileio import clear_leftovers, replace_dir, write_json
from .monitor import METRICS, VALIDATION, log_line

TOKENIZER_RECORD = "littune_tokenizer.json"

#: what littune writes in a run directory (besides checkpoints/) through a temporary name
RUN_FILES = ("model", "tokenizer", "config.yaml", "results.json", METRICS, VALIDATION)


def open_run_dir(run_dir: Path):
    """Rank 0, at the start of a run: lock ``run_dir`` (a second run is refused) and clear what killed
    runs left there (module doc), each said. Returns the lock, for :func:`close_run_dir`."""
    from ..cache.lock import lock

    held = lock(run_dir, what="run directory", by="`littune train`")
    for line in (clear_leftovers(run_dir / "checkpoints", everything=True)
                 + clear_leftovers(run_dir, everything=True, names=RUN_FILES)):
        log_line(line)
    return held


def close_run_dir(held) -> None:
    from ..cache.lock import unlock

    unlock(held)


def captions_fingerprint(captions: Iterable[str]) -> str:
    """``<count>-<sha256 prefix>`` of the captions, in order."""
    h, n = hashlib.sha256(), 0
    for c in captions:
        b = c.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    return f"{n}-{h.hexdigest()[:16]}"


def ensure_tokenizer(tok_dir: Path, spec: dict, captions: Callable[[], Iterable[str]], resuming: bool) -> None:
    """Rank 0: make ``tok_dir`` hold the tokenizer that the text-tower ``spec`` and ``captions()`` make
    (module doc). ``resuming``: a checkpoint was trained with the tokenizer there, which is then never
    replaced -- one made by a littune that kept no record is trusted, another record is refused."""
    want = {"tokenizer": spec.get("tokenizer", "bpe"), "vocab_size": spec.get("vocab_size", 8000),
            "captions": captions_fingerprint(captions())}
    present = (tok_dir / "tokenizer.json").is_file()
    try:
        have = json.loads((tok_dir / TOKENIZER_RECORD).read_text())
    except (OSError, ValueError):
        have = None
    if present and (have == want or (resuming and have is None)):
        return
    changed = "no record" if have is None else ", ".join(
        f"{k} {have.get(k)!r}, now {want[k]!r}" for k in want if have.get(k) != want[k])
    if present and resuming:
        raise LittuneError(f"{tok_dir} (the tokenizer) was made from other settings or captions ({changed}), and "
                           f"the checkpoints in {tok_dir.parent / 'checkpoints'} were trained with it: use another "
                           "run_dir, or delete its checkpoints/ and tokenizer/ to start over")
    if present:
        log_line(f"{tok_dir} was made from other settings or captions ({changed}): training a new one")
    from ..towers.text import train_tokenizer

    tok = train_tokenizer(captions(), vocab_size=want["vocab_size"], kind=want["tokenizer"])
    tmp = tok_dir.with_name(f".{tok_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(tmp)
        write_json(tmp / TOKENIZER_RECORD, want)
        replace_dir(tmp, tok_dir)  # the tokenizer and its record, whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StopSignals:
    """While entered, SIGINT and SIGTERM set :attr:`signum` (the first) instead of stopping the
    process; a second one raises ``KeyboardInterrupt`` at once. The handlers found are given back on
    exit. Outside the main thread (where Python allows no handler) nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if D.is_main():  # a raw write: safe whatever the interrupted code was printing
            os.write(2, f"littune train: {self.name}: stopping after this step, with a checkpoint of it; "
                        "send it again to stop at once\n".encode())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def asked(self, device) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer: they stop together)."""
        return D.any_rank(self.signum is not None, device)
