"""PNG plots: a run's training loss, temperature, learning rate and validation metrics; heat maps over
their images (``littune classify --heatmap``, the pointing game)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from .errors import LittuneError

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


# -- heat maps ---------------------------------------------------------------------------------------
def pyplot(what: str):
    """``matplotlib.pyplot`` on the Agg backend, or a one-line :class:`LittuneError` saying ``what`` needs it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LittuneError(f"{what} needs matplotlib: pip install 'littune[plot]'") from None
    return plt


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """Lay ``fig`` out, write it to ``path`` (its folder made) and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def draw_heat(ax, image, heat, crop: Sequence[float], size: Sequence[int], title: str = "",
              limits: tuple[float, float] | None = None, point=None, hit: bool | None = None, boxes=()):
    """On ``ax``: ``image`` (``size`` = its ``(width, height)``) with the map ``heat`` ``(h, w)`` over the area
    ``crop`` it covers; ``point`` ``(x, y)`` marked (green when ``hit``, red when not), ``boxes`` outlined."""
    from matplotlib.patches import Rectangle

    width, height = size
    ax.imshow(image, extent=(0, width, height, 0))
    if heat is not None:
        vmin, vmax = limits if limits is not None else (float(heat.min()), float(heat.max()))
        ax.imshow(heat, extent=(crop[0], crop[2], crop[3], crop[1]), cmap="jet", alpha=0.5,
                  interpolation="bilinear", vmin=vmin, vmax=vmax)
    for x0, y0, x1, y1 in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec="black"))
    if point is not None:
        colour = "white" if hit is None else ("lime" if hit else "red")
        ax.plot([point[0]], [point[1]], marker="+", ms=14, mew=2.5, color=colour)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def save_heatmap_figure(hm, path: str | Path, titles: Sequence[str], columns: int = 4) -> Path:
    """``path``: the image of the :class:`~littune.inference.heatmap.HeatMap` ``hm``, then each of its maps over the
    image with its title (``titles[i]`` for ``hm.maps[i]``, one colour scale for all, the peak marked)."""
    plt = pyplot("drawing heat maps")
    panels = 1 + len(hm.maps)
    cols = min(panels, columns)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    limits = (float(hm.maps.min()), float(hm.maps.max()))
    draw_heat(flat[0], hm.image, None, hm.crop, hm.image_size, "image")
    for i, title in enumerate(titles):
        draw_heat(flat[i + 1], hm.image, hm.maps[i], hm.crop, hm.image_size, title, limits, point=hm.peak(i))
    for ax in flat[panels:]:
        ax.axis("off")
    note = "" if hm.exact else " (approximate: the tower is not mean-pooled)"
    fig.suptitle(f"cosine of each location with each label, {limits[0]:.2f} (blue) to {limits[1]:.2f} (red){note}",
                 fontsize=9)
    return save_figure(fig, path, dpi=100)
