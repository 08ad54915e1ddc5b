"""How a ``littune train`` run ends, as its user sees it.

* :func:`finished_step`: a run directory whose run finished -- its last checkpoint at ``steps``,
  ``model/`` written after it, ``results.json`` too when the ``val`` section names sets, and
  ``config.yaml`` the same but for keys that change nothing computed (:data:`COSMETIC`) -- is not
  trained again: one line says where its model is (it used to "resume" at the last step, validate
  again and rewrite ``model/``). Raise ``steps`` to train it further.
* :func:`interrupted`: Ctrl-C (or SIGTERM) during the steps: the progress bar is closed first, so the
  line saying which checkpoint was written starts a line of its own, and the :class:`RunInterrupted`
  it returns tells the command line that the user has been told (the message is printed once).
* :func:`print_results`: the final validation results (``results.json``) as a table, each retrieval
  recall with its direction (:func:`littune.eval.names.metric_label`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .checkpoint import latest_checkpoint
from ..eval.names import for_stream, metric_label
from .monitor import log_line

#: configuration keys that change nothing a finished run computed (run_dir: the folder, moved, is the run)
COSMETIC = {"progress", "log_every", "checkpoint_every", "keep_checkpoints", "device", "run_dir"}
#: the columns of the validation table (every metric is in results.json)
COLUMNS = ("acc1", "acc5", "image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
           "text_retrieval_recall@5")


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM after its checkpoint was written and the user told so."""

    reported = True


def finished_step(run_dir: Path, cfg) -> int | None:
    """The step a finished run in ``run_dir`` ended at, saying so in one line; None when there is training
    (or its end: validation, export) to do."""
    run_dir = Path(run_dir)
    ckpt, model = latest_checkpoint(run_dir), run_dir / "model" / "config.json"  # config.json: written last
    if ckpt is None or not model.is_file() or not (run_dir / "config.yaml").is_file():
        return None
    state = ckpt / "state.json"
    step = json.loads(state.read_text()).get("step")
    if step != cfg.steps or model.stat().st_mtime < state.stat().st_mtime:
        return None  # more steps asked for, or the export of the last one did not finish
    results = run_dir / "results.json"
    if (cfg.val.zeroshot or cfg.val.retrieval) and not (results.is_file() and
                                                         results.stat().st_mtime >= state.stat().st_mtime):
        return None
    old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    if any(old.get(k) != new.get(k) for k in set(old) | set(new) if k not in COSMETIC):
        return None
    log_line(f"run {run_dir} finished at step {step}; its model is {run_dir / 'model'}: nothing to do; "
             "delete it or give another --run-dir to train again")
    return step


def interrupted(step: int, monitor) -> RunInterrupted:
    """Say once, on a line of its own, that the run stopped with a checkpoint at ``step``; the exception to raise."""
    if monitor is not None:
        monitor.bar.close()  # the bar's line ends here, not inside the message
    log_line(f"interrupted: checkpoint written at step {step}; run the same command again to resume")
    return RunInterrupted()


def validation_table(results: dict) -> str:
    """``{set: metrics}`` as an aligned text table: one row a validation set, one column a metric of
    :data:`COLUMNS` that some set has (``-`` where a set has not); empty without such metrics."""
    keys = [k for k in COLUMNS if any(isinstance(m, dict) and k in m for m in results.values())]
    if not keys:
        return ""
    rows = [["validation set", *(metric_label(k) for k in keys)]]
    for name, metrics in results.items():
        rows.append([str(name), *(f"{metrics[k]:.3f}" if isinstance(metrics.get(k), (int, float)) else "-"
                                  for k in keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def print_results(run_dir: Path, stream=None) -> None:
    """Print the run's final validation results (``results.json``) as a table; nothing without them."""
    stream = stream or sys.stdout
    path = Path(run_dir) / "results.json"
    table = validation_table(json.loads(path.read_text())) if path.is_file() else ""
    if table:
        print(for_stream(f"final validation (every metric in {path}):\n{table}", stream), file=stream)
