"""What keeps a run directory whole: one run at a time, no leftovers, a stop only at a step boundary.

**One run at a time.** Rank 0 holds an exclusive lock on ``RUN_DIR/.lock`` for the whole run, as
``littune embed`` holds one on a cache (:func:`littune.cache.lock.lock`: released by the OS even on
kill -9); a second ``littune train`` into the same folder, however spelled, is refused in one line
that names the first (pid, host, start time).

**Leftovers.** A run killed while it wrote a checkpoint, ``model/`` or a metrics file leaves a
temporary (``checkpoints/.tmp-step_*-PID``, ``.model.tmp-PID``...) or, killed between the two renames
that replace a folder, the old folder moved aside. Once it holds the lock, a run removes the first
and puts the second back (:func:`littune.fileio.clear_leftovers`): no one else writes there.

**Stopping.** While the trainer's loop runs, Ctrl-C (SIGINT) and SIGTERM only ask it to stop
(:class:`StopSignals`): the step under way completes -- weights, optimiser, schedule, metrics line --
and the loop stops at the boundary after it, writing a checkpoint of exactly that step. A second
signal stops at once, writing nothing (the last checkpoint stays the one to resume from).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from . import distributed as D
from .fileio import clear_leftovers
from .monitor import METRICS, VALIDATION, log_line

#: what littune writes in a run directory (besides checkpoints/) through a temporary name
RUN_FILES = ("model", "tokenizer", "config.yaml", "results.json", METRICS, VALIDATION)


def open_run_dir(run_dir: Path):
    """Rank 0, at the start of a run: lock ``run_dir`` (a second run is refused) and clear what killed
    runs left there (module doc), each said. Returns the lock, for :func:`close_run_dir`."""
    from .cache.lock import lock

    held = lock(run_dir, what="run directory", by="`littune train`")
    for line in (clear_leftovers(run_dir / "checkpoints", everything=True)
                 + clear_leftovers(run_dir, everything=True, names=RUN_FILES)):
        log_line(line)
    return held


def close_run_dir(held) -> None:
    from .cache.lock import unlock

    unlock(held)


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
