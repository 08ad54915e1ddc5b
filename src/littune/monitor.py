"""The run directory: what a training run writes besides checkpoints and the model.

``config.yaml`` (the resolved configuration; a resumed run must match it), ``metrics.jsonl`` (one
line per step), ``val.jsonl`` and ``results.json`` (validation), ``tensorboard/`` when TensorBoard
is installed, and ``plots/`` at the end. Only rank 0 writes; on resumption the metric files are
cut back to the checkpoint's step so that they read as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from . import distributed as D
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .errors import ConfigError

# Keys that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"steps", "epochs", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "val", "device"}
METRICS = "metrics.jsonl"
VALIDATION = "val.jsonl"


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Create ``run_dir`` and write ``config.yaml``; refuse to resume a run configured otherwise."""
    saved = run_dir / "config.yaml"
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        if saved.exists() and latest_checkpoint(run_dir):
            old = yaml.safe_load(saved.read_text())
            new = cfg.to_dict()
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
            if diff:
                raise ConfigError(
                    f"{run_dir} holds a run with a different configuration ({', '.join(diff)} differ): "
                    "use another run_dir, or delete its checkpoints/ to start over")
        cfg.save(saved)
    D.barrier()


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the metric lines after ``step`` (written by a run that stopped after its last checkpoint)."""
    if not D.is_main():
        return
    for path in (run_dir / METRICS, run_dir / VALIDATION):
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            path.write_text("".join(k + "\n" for k in keep))


def record_validation(run_dir: Path, step: int, results: dict, final: bool) -> None:
    """Append to ``val.jsonl``; the final results also go to ``results.json``."""
    with open(run_dir / VALIDATION, "a") as f:
        f.write(json.dumps({"step": step, "val": results}) + "\n")
    if final:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))


def log_line(text: str) -> None:
    if D.is_main():
        print(f"littune train: {text}", file=sys.stderr)


class Monitor:
    """Progress bar, metrics.jsonl, TensorBoard (optional), and the end-of-run plots."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, start: int):
        from tqdm.auto import tqdm

        self.run_dir, self.cfg = run_dir, cfg
        self.file = open(run_dir / METRICS, "a")
        self.bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model.setting}", unit="step",
                        disable=not cfg.progress, dynamic_ncols=True, file=sys.stderr)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: JSON lines only
            self.tb = None

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
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

