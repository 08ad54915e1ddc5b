"""PNG plots of a run: training loss, temperature, learning rate and validation metrics."""

from __future__ import annotations

import json
from pathlib import Path

from .eval.names import metric_label


def _read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def lr_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, lr), ...]}`` for the learning-rate panel: ``lr`` (the schedule's) and each
    part's ``lr_image``, ``lr_text``, ``lr_head`` where the log has them (older logs hold ``lr`` only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k == "lr" or k.startswith("lr_"):
                series.setdefault(k, []).append((r["step"], v))
    return series


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``plots/training.png`` (and ``plots/validation.png`` when validated); returns the files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    train = _read(run_dir / "metrics.jsonl")
    if train:
        steps = [r["step"] for r in train]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(steps, [r["loss"] for r in train], lw=0.8)
        axes[0].set(title="contrastive loss", xlabel="step")
        axes[1].plot(steps, [r["temperature"] for r in train])
        axes[1].set(title="temperature (1/τ)", xlabel="step")
        lrs = lr_series(train)
        for name, pts in lrs.items():
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], label=name,
                         lw=2.0 if name == "lr" else 1.0, ls=":" if name == "lr" and len(lrs) > 1 else "-")
        axes[2].set(title="learning rate", xlabel="step")
        if len(lrs) > 1:  # lr: the schedule's; lr_<part>: each part's
            axes[2].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "training.png", dpi=110, bbox_inches="tight")  # nothing cut at the edges
        plt.close(fig)
        written.append(out / "training.png")
    val = _read(run_dir / "val.jsonl")
    if val:
        # One line per validation set: its headline metric (zero-shot top-1, text->image recall@1).
        headline = ("acc1", "image_retrieval_recall@1")
        series: dict[str, list] = {}
        for r in val:
            for name, metrics in r["val"].items():
                for k in headline:
                    if isinstance(metrics.get(k), (int, float)):
                        series.setdefault(f"{name} {metric_label(k)}", []).append((r["step"], metrics[k]))
        fig, ax = plt.subplots(figsize=(9, 4))
        for label, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(title="validation (zero-shot top-1, text→image R@1; all metrics in val.jsonl)", xlabel="step",
               ylim=(0, 1))
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / "validation.png", dpi=110, bbox_inches="tight")  # the legend beside the axes too
        plt.close(fig)
        written.append(out / "validation.png")
    return written
