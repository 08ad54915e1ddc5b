"""The run directory: what a training run writes besides checkpoints and the model.

``config.yaml`` (the resolved configuration; a resumed run must match it), ``metrics.jsonl`` (one
line per step), ``val.jsonl`` and ``results.json`` (validation), ``tensorboard/`` when TensorBoard
is installed, and ``plots/`` at the end. Only rank 0 writes; on resumption the metric files are
cut back to the checkpoint's step so that they read as one uninterrupted run.

A metrics line is appended with one write (:class:`LineLog`); a write that fails part-way (a full
disk) is cut back off, so the files hold whole lines only. An incomplete last line all the same (a
power cut) is dropped, with a word, when the run resumes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from . import distributed as D
from .checkpoint import latest_checkpoint
from ..config import TrainConfig
from ..errors import ConfigError, LittuneError
from ..fileio import atomic_write

# Keys that may differ between a run and its resumption (they do not change what is computed). run_dir
# is the folder itself, wherever it is now and however it is spelled (it may have been moved or copied).
RESUMABLE_CHANGES = {"run_dir", "epochs", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "val",
                     "device"}  # epochs: what it changes, steps, is checked on its own
METRICS = "metrics.jsonl"
VALIDATION = "val.jsonl"


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create ``run_dir`` and write ``config.yaml``; refuse to resume a run configured otherwise."""
    saved = run_dir / "config.yaml"
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(run_dir)
        if ckpt:
            _check_resumable(run_dir, cfg, int(ckpt.name.rsplit("_", 1)[-1]))
        atomic_write(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    D.barrier()


def config_differences(old: dict, new: dict) -> list[str]:
    """The top-level keys of two configurations (as dicts) that differ in what they compute."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)


def read_run_config(path: Path) -> dict:
    """A run directory's ``config.yaml`` as saved (a mapping), or a one-line ConfigError."""
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not readable YAML ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a run's configuration (not a mapping)")
    return saved


def _check_resumable(run_dir: Path, cfg: TrainConfig, step: int) -> None:
    """A run resumed from its checkpoint of ``step`` must be configured as it was, ``steps`` included:
    the learning-rate schedule runs to ``steps``, so another value changes the steps still to come."""
    saved, new = run_dir / "config.yaml", cfg.to_dict()
    old = None
    if saved.exists():
        old = read_run_config(saved)
        diff = config_differences(old, new)
        if diff and diff != ["steps"]:
            raise ConfigError(f"{run_dir} holds a run with a different configuration ({', '.join(diff)} differ): "
                              "use another run_dir, or delete its checkpoints/ to start over")
    was = old.get("steps") if old else None
    if (was is not None and was != new["steps"]) or new["steps"] < step:
        change = ("would end before it" if new["steps"] < step
                  else "would change its learning-rate schedule from there on")
        fix = f"set steps={was}" if was is not None else f"set steps to {step} or more"
        of = f"of steps={was} " if was is not None else ""
        raise ConfigError(f"steps: {run_dir} holds a run {of}with a checkpoint at step {step}; resuming it with "
                          f"steps={new['steps']} {change}: {fix}, or use another run_dir")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the metric lines after ``step`` (written by a run that stopped after its last checkpoint)."""
    if not D.is_main():
        return
    for path in (run_dir / METRICS, run_dir / VALIDATION):
        if path.exists():
            keep = [line for line, record in read_lines(path) if record["step"] <= step]
            try:
                atomic_write(path, "".join(k + "\n" for k in keep))  # the old file, or the new one whole
            except OSError as e:
                raise LittuneError(f"could not rewrite {path} ({e.strerror}): it is kept as it was; free disk "
                                   "space and run the same command again to resume") from None


def read_lines(path: Path) -> list[tuple[str, dict]]:
    """The lines of a metrics file with their records. An incomplete last line (a write cut short) is
    dropped, and said; any other line that is not a record is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, as it does unless a write was cut short
    out = []
    for number, line in enumerate(lines + [tail], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError as e:
            if number < len(lines) or (number == len(lines) and tail.strip()):
                raise LittuneError(f"{path}:{number}: not a metrics record ({e}); fix or delete that line") from None
            log_line(f"{path}: dropped an incomplete last line ({len(line)} characters: a write cut short)")
            continue
        out.append((line, record))
    return out


def record_validation(run_dir: Path, step: int, results: dict, final: bool) -> None:
    """Append to ``val.jsonl``; the final results also go to ``results.json``."""
    log = LineLog(run_dir / VALIDATION)
    try:
        log.write({"step": step, "val": results})
    finally:
        log.close()
    if final:
        atomic_write(run_dir / "results.json", json.dumps(results, indent=2))


class LineLog:
    """A JSON-lines file that only ever holds whole lines: each record is appended with one write,
    and a write that fails part-way (a full disk) is cut back off and raised as a one-line error."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            done = os.write(self.fd, data)
            while done < len(data):  # a short write: the rest fails with the reason, or goes through
                done += os.write(self.fd, data[done:])
        except OSError as e:
            try:
                os.ftruncate(self.fd, size)
            except OSError:
                pass
            raise LittuneError(f"could not write to {self.path} ({e.strerror}): it is kept as it was, and so "
                               "is the last checkpoint; free disk space and run the same command again to resume"
                               ) from None

    def close(self) -> None:
        os.close(self.fd)


def log_line(text: str) -> None:
    if D.is_main():
        print(f"littune train: {text}", file=sys.stderr)


class Monitor:
    """Progress bar, metrics.jsonl, TensorBoard (optional), and the end-of-run plots."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int):
        from tqdm.auto import tqdm

        self.run_dir, self.cfg = run_dir, cfg
        self.file = LineLog(run_dir / METRICS)
        self.bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model.setting}", unit="step",
                        disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def log(self, record: dict) -> None:
        self.file.write(record)
        post = {"loss": f"{record['loss']:.4f}", "T": f"{record['temperature']:.1f}"}
        if "pairs_per_s" in record:
            post["pairs/s"] = f"{record['pairs_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if self.tb:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def log_val(self, step: int, results: dict) -> None:
        if self.tb:
            for name, metrics in results.items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        self.tb.add_scalar(f"val/{name}/{k}", v, step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb:
            self.tb.close()

