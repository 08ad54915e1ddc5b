"""How long a training run is: sized from what it trains on, where the configuration does not say.

Three values size a run: the batch (``data.batch_size``), the number of steps (``steps``, or
``epochs`` of the training pairs) and the warm-up (``schedule.warmup_steps``). Each one left unset
(null, the default) is chosen once the data is open (:func:`plan_run`), by :data:`SIZING`'s rule:

- batch: 256; with fewer than 8 batches of 256 pairs, the largest power of two that still makes 8
  batches (an epoch of at least 8 steps, which drops under an eighth of the pairs), at least 2;
- steps: ``epochs`` x pairs / batch; with neither set, 15 epochs (760 captioned drawings reached a
  training loss of 0.13 in 12.6 epochs, and a set this small overfits well before the warning's 50),
  at most 1,000 steps: from 17,067 pairs on, a run is the 1,000 steps of 256 with 100 steps of
  warm-up that littune ran before it was sized;
- warm-up: ``schedule.warmup_fraction`` (0.1) of the steps.

A value given always wins (``steps`` over ``epochs``). The resolved values are written to the run's
``config.yaml``; a run resumed from a checkpoint takes each value not given from there, so the same
command resumes the same plan (even if this rule changes). The plan is printed before step 1, the
measured time per step after a few steps (:class:`Timed`), and a warning above 50 epochs.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BATCH = 256  # the batch of a set big enough for it
STEPS_PER_EPOCH = 8  # the fewest steps an epoch of a sized batch takes
DEFAULT_EPOCHS = 15
STEP_BUDGET = 1000  # the most steps the default number of epochs takes
WARN_EPOCHS = 50
TIMED_STEPS = 5  # steps timed (after the first, which warms up) for the estimate

SIZING = "\n".join([
    "How long a run is, where not set (null): sized from the N training pairs once the data is open.",
    f"  data.batch_size        {BATCH}; with N < {STEPS_PER_EPOCH * BATCH:,}: the largest power of two up to "
    f"N / {STEPS_PER_EPOCH} (at least 2)",
    f"  steps                  epochs x N / batch; neither set: {DEFAULT_EPOCHS} epochs, at most {STEP_BUDGET:,} steps",
    "  schedule.warmup_steps  schedule.warmup_fraction (default 0.1) x steps",
    "A value set always wins (steps over epochs). Printed before step 1: the plan; after step "
    f"{TIMED_STEPS + 1}: the measured",
    f"time per step; above {WARN_EPOCHS} epochs: a warning. config.yaml records the values used; a resumed run "
    "keeps them."])

#: what a printed configuration (``--print-config``) says after each sizing key left null
NULL_MEANS = {"steps: null": "epochs x pairs / batch (see the top)",
              "epochs: null": f"with steps null too: {DEFAULT_EPOCHS}, at most {STEP_BUDGET:,} steps (see the top)",
              "  batch_size: null": "sized from the pairs (see the top)",
              "  warmup_steps: null": "warmup_fraction x steps"}


@dataclass
class Plan:
    pairs: int  # the rows an epoch visits
    batch: int
    steps: int
    warmup: int
    how: dict = field(default_factory=dict)  # key -> "sized" | "kept" (from a resumed run's config.yaml) | a note

    @property
    def epochs(self) -> float:
        return self.steps * self.batch / self.pairs

    def line(self) -> str:
        """``760 pairs, batch 64, 178 steps = 15.0 epochs, warm-up 18 steps (...)``."""
        text = (f"{self.pairs:,} pairs, batch {self.batch}, {self.steps:,} steps = {self.epochs:.1f} epochs, "
                f"warm-up {self.warmup} step{'' if self.warmup == 1 else 's'}")
        sized = [k for k, v in self.how.items() if v == "sized"]
        kept = [k for k, v in self.how.items() if v == "kept"]
        notes = [v for v in self.how.values() if v not in ("sized", "kept")]
        if kept:
            notes.append(f"kept from the run being resumed: {', '.join(kept)}")
        if sized:
            notes.append(f"sized: {', '.join(sized)}; see littune train --help")
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def warning(self) -> str | None:
        if round(self.epochs, 1) <= WARN_EPOCHS:  # as printed: epochs=50 gives 50.02
            return None
        return (f"warning: {self.epochs:.0f} epochs: a small dataset trained this long overfits; "
                "set epochs= or steps=")


def sized_batch(pairs: int, unit: int = 1) -> int:
    """:data:`BATCH`, halved while the data holds fewer than :data:`STEPS_PER_EPOCH` batches (not below 2);
    a multiple of ``unit`` (grad_accum x ranks)."""
    batch = BATCH
    while batch > 2 and batch * STEPS_PER_EPOCH > pairs:
        batch //= 2
    return max(unit, batch // unit * unit)


def make_plan(cfg, pairs: int, unit: int = 1, saved: dict | None = None) -> Plan:
    """The batch, steps and warm-up of ``cfg`` (a TrainConfig): each as given, else the resumed run's
    (``saved``: its config.yaml, :func:`saved_plan`), else sized from ``pairs``."""
    saved, how = saved or {}, {}

    def choose(key: str, given, rule):
        if given is not None:
            return given
        if saved.get(key) is not None:
            how[key] = "kept"
            return saved[key]
        how[key] = "sized"
        return rule()

    batch = choose("data.batch_size", cfg.data.batch_size, lambda: sized_batch(pairs, unit))
    if cfg.steps is None and cfg.epochs is not None:
        steps = max(1, round(cfg.epochs * pairs / batch))
        how["steps"] = f"steps from epochs={cfg.epochs:g}"
    else:
        steps = choose("steps", cfg.steps, lambda: max(1, min(STEP_BUDGET, round(DEFAULT_EPOCHS * pairs / batch))))
        if cfg.steps is not None and cfg.epochs is not None:
            how["epochs"] = f"steps={cfg.steps} given: epochs={cfg.epochs:g} not used"
    warmup = choose("schedule.warmup_steps", cfg.schedule.warmup_steps,
                    lambda: round(cfg.schedule.warmup_fraction * steps))
    return Plan(pairs, batch, steps, warmup, how)


def saved_plan(run_dir: Path) -> dict:
    """The sized values in ``run_dir/config.yaml`` when the run has a checkpoint to resume from, else {}."""
    from .checkpoint import latest_checkpoint

    path = Path(run_dir) / "config.yaml"
    if not path.exists() or latest_checkpoint(Path(run_dir)) is None:
        return {}
    from .monitor import read_run_config

    saved = read_run_config(path)
    found = {"steps": saved.get("steps"), "data.batch_size": (saved.get("data") or {}).get("batch_size"),
             "schedule.warmup_steps": (saved.get("schedule") or {}).get("warmup_steps")}
    return {k: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool)}


def training_pairs(trainer) -> int:
    """The rows one epoch of ``trainer`` visits: the cache's captioned images (less ``data.exclude``, with
    ``data.anchors``' rows), or the source's captioned records."""
    if trainer.use_cache:
        return trainer._cache_batches().pairs
    return sum(1 for r in trainer.records if r.captions)


def plan_run(trainer):
    """``(cfg, plan)``: ``trainer.cfg`` with its batch, steps and warm-up resolved (validated again), and
    the :class:`Plan` (:func:`announce` prints it). Called once the data is open, before the run directory
    is prepared."""
    from . import distributed as D

    cfg = copy.deepcopy(trainer.cfg)
    pairs = training_pairs(trainer)
    unit = math.lcm(cfg.grad_accum, trainer.world)
    plan = make_plan(cfg, pairs, unit, saved_plan(trainer.run_dir))
    D.barrier()  # every rank has read config.yaml before rank 0 writes it again
    cfg.data.batch_size, cfg.steps, cfg.schedule.warmup_steps = plan.batch, plan.steps, plan.warmup
    cfg.validate()
    if trainer.use_cache:
        trainer._cache_batches().set_batch(plan.batch)
    return cfg, plan


def announce(plan) -> None:
    """The plan's line (and its warning, if any), before step 1."""
    from .monitor import log_line

    log_line(plan.line())
    if plan.warning():
        log_line(plan.warning())


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Timed:
    """``batches`` (one per step from ``start`` to ``total``) as they are; when the step after
    :data:`TIMED_STEPS` timed steps is asked for, prints the measured time per step and what is left."""

    def __init__(self, batches, start: int, total: int):
        self.batches, self.step, self.total, self.asked, self.t1 = batches, start, total, 0, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        self.asked += 1
        if self.asked == 2:  # the first step done: the timing starts
            self.t1 = time.perf_counter()
        elif self.asked == TIMED_STEPS + 2 and self.step < self.total:
            self._report((time.perf_counter() - self.t1) / TIMED_STEPS)
        self.step += 1
        return next(self.batches)

    def _report(self, per_step: float) -> None:
        from tqdm.auto import tqdm

        from . import distributed as D

        left = self.total - self.step
        if D.is_main():
            tqdm.write(f"littune train: measured: {per_step:.3g} s/step, about {duration(per_step * left)} left "
                       f"({left:,} steps) on this machine", file=sys.stderr)

    def close(self) -> None:
        getattr(self.batches, "close", lambda: None)()


def annotate(printed: str) -> str:
    """A printed configuration (``--print-config``) with :data:`SIZING` on top and a word after each
    sizing key left null."""
    out = ["# " + ln for ln in SIZING.splitlines()]
    out += [f"{ln}  # {NULL_MEANS[ln]}" if ln in NULL_MEANS else ln for ln in printed.splitlines()]
    return "\n".join(out) + "\n"
