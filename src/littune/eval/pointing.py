"""The pointing game: does a name's heat map peak on the thing it names?

Collages of 2 to 4 labelled images (emoji of held-out designs, so nothing the model was trained on)
pasted at random, non-overlapping places and sizes on a white canvas, each inside the part of the canvas
the model sees (its eval view's centre crop). For every image pasted, its class name's heat map
(:mod:`littune.inference.heatmap`: the tower run once per collage, the head at each location, the cosine with the
name's prompts through a template set) is asked where the name is; the answer -- the centre of the map's
highest cell -- *hits* when it falls inside the pasted image's box (the tight box of its drawn, non-white
pixels). Reported, over every (collage, name) trial:

* ``pointing_accuracy`` -- the fraction of hits;
* ``pointing_accuracy_among_names`` -- the same with each location's cosines turned into a softmax over
  the collage's own names (which of the names present wins there, at the model's temperature);
* ``centre_baseline`` -- always pointing at the canvas centre;
* ``random_baseline`` -- pointing at a uniformly random cell of the map (the expected hit rate: the
  fraction of cell centres inside the box, exactly, no draws);
* ``reachable`` -- the share of trials whose box holds at least one cell centre (the most any map could hit).

A seed makes the collages the same at every run. ``littune eval pointing FOLDER --model DIR --out
pointing.json --figure pointing.png`` writes the numbers (and every trial) and a figure of the first
collages with their maps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LittuneError

#: the collages' tile side, as a fraction of the side of the canvas area the model sees
SCALE = (0.28, 0.42)
#: a pixel is drawn (not background) when a channel is this far from white
INK = 24


@dataclass
class Layout:
    """Where a collage's images go: ``items[i]`` (a record index) at ``squares[i]`` (x0, y0, side) in canvas pixels."""

    items: list[int]
    squares: list[tuple[int, int, int]]


@dataclass
class PointingResult:
    metrics: dict
    trials: list[dict]
    #: the first collages (image, trials) kept for the figure
    shown: list[tuple[Any, list[dict], np.ndarray]] = field(default_factory=list)
    crop: tuple = ()


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def layout(rng: random.Random, labels: Sequence[int], area: Sequence[float], count: int) -> Layout:
    """``count`` images of distinct classes (``labels[i]``: the class of record ``i``) on non-overlapping
    squares inside ``area`` (left, top, right, bottom), their sides drawn from :data:`SCALE`."""
    left, top, right, bottom = area
    side = min(right - left, bottom - top)
    for _ in range(1000):
        squares: list[tuple[int, int, int]] = []
        for _ in range(count):
            s = int(side * rng.uniform(*SCALE))
            for _ in range(50):
                sq = (int(rng.uniform(left, right - s)), int(rng.uniform(top, bottom - s)), s)
                if not any(_overlaps(sq, o) for o in squares):
                    squares.append(sq)
                    break
        if len(squares) == count:
            break
    else:  # pragma: no cover - 4 tiles of at most 0.42 of the side always fit in the end
        raise LittuneError(f"could not place {count} images on the canvas")
    items: list[int] = []
    while len(items) < count:
        i = rng.randrange(len(labels))
        if all(labels[i] != labels[j] for j in items):
            items.append(i)
    return Layout(items, squares)


def render(layout_: Layout, records: Sequence, canvas: int):
    """``(collage image, boxes)``: the layout's images pasted on a white ``canvas`` x ``canvas`` square, and
    each one's tight box (x0, y0, x1, y1) of drawn pixels (its whole square if it has none)."""
    from PIL import Image

    from ..data.decode import BadImage
    from ..inference.embeddings import describe, load_rgb

    out = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    boxes = []
    for i, (x, y, s) in zip(layout_.items, layout_.squares):
        try:
            tile = load_rgb(records[i]).resize((s, s), Image.Resampling.LANCZOS)
        except BadImage as e:
            raise LittuneError(f"cannot read image {describe(records[i])}: {e.reason}"
                               + (f": {e.detail}" if e.detail else "")) from None
        out.paste(tile, (x, y))
        ink = np.argwhere((255 - np.asarray(tile, dtype=np.int16)).max(axis=2) > INK)
        if len(ink):
            (r0, c0), (r1, c1) = ink.min(0), ink.max(0)
            boxes.append((x + int(c0), y + int(r0), x + int(c1) + 1, y + int(r1) + 1))
        else:
            boxes.append((x, y, x + s, y + s))
    return out, boxes


def inside(point: Sequence[float], box: Sequence[float]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def cell_centres(crop: Sequence[float], grid: tuple[int, int]) -> np.ndarray:
    """``(h * w, 2)``: the centre of every cell of a ``grid`` map covering ``crop``, in canvas pixels."""
    h, w = grid
    xs = crop[0] + (np.arange(w) + 0.5) * (crop[2] - crop[0]) / w
    ys = crop[1] + (np.arange(h) + 0.5) * (crop[3] - crop[1]) / h
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def score(maps: np.ndarray, names: list[str], boxes: list, crop: Sequence[float], canvas: int,
          logit_scale: float) -> list[dict]:
    """One trial per name: its map's peak (and its peak among the names), hits, and both baselines' hits."""
    from ..inference.heatmap import cell_centre

    among = F.softmax(logit_scale * torch.from_numpy(maps), dim=0).numpy()
    centres = cell_centres(crop, maps.shape[1:])
    trials = []
    for k, (name, box) in enumerate(zip(names, boxes)):
        point, point2 = cell_centre(maps[k], crop), cell_centre(among[k], crop)
        cells = [inside(c, box) for c in centres]
        trials.append({"name": name, "box": [int(v) for v in box], "point": [round(v, 2) for v in point],
                       "hit": inside(point, box), "hit_among_names": inside(point2, box),
                       "centre_hit": inside((canvas / 2, canvas / 2), box), "random_hit": float(np.mean(cells)),
                       "count": len(names)})
    return trials


def summarize(trials: list[dict]) -> dict:
    """The four rates (module doc) over ``trials``."""
    mean = lambda key: float(np.mean([float(t[key]) for t in trials])) if trials else 0.0  # noqa: E731
    return {"pointing_accuracy": mean("hit"), "pointing_accuracy_among_names": mean("hit_among_names"),
            "centre_baseline": mean("centre_hit"), "random_baseline": mean("random_hit"),
            "reachable": float(np.mean([t["random_hit"] > 0 for t in trials])) if trials else 0.0, "trials": len(trials)}


def play(model, dataset, collages: int = 200, seed: int = 0, canvas: int = 448, templates: str = "emoji",
         counts: tuple[int, int] = (2, 4), batch_size: int = 16, show: int = 4, progress: bool = False) -> PointingResult:
    """The pointing game of ``model`` on ``collages`` collages of ``dataset`` (a
    :class:`~littune.eval.sets.LabeledImages`, e.g. a class folder of held-out designs)."""
    from ..inference.heatmap import spatial_embeddings, text_weights

    if collages < 1 or not 2 <= counts[0] <= counts[1]:
        raise LittuneError(f"the pointing game needs at least one collage of at least 2 images, not {collages} "
                           f"of {counts[0]}..{counts[1]}")
    if len(set(dataset.labels)) < counts[1]:
        raise LittuneError(f"{dataset.description} has {len(set(dataset.labels))} classes: a collage of "
                           f"{counts[1]} images needs as many")
    pre = model.preprocess
    crop = pre.eval_box(canvas, canvas)
    rng = random.Random(seed)
    layouts = [layout(rng, dataset.labels, crop, rng.randint(*counts)) for _ in range(collages)]
    names = sorted({dataset.classnames[dataset.labels[i]] for lay in layouts for i in lay.items})
    weights = dict(zip(names, text_weights(model, names, templates).cpu()))
    scale = float(model.logit_scale.detach().exp())
    result = PointingResult({}, [], crop=crop)
    seconds, grid, how, exact = 0.0, None, "", True
    for start in range(0, collages, batch_size):
        batch = [render(lay, dataset.records, canvas) for lay in layouts[start:start + batch_size]]
        t0 = time.perf_counter()
        emb, sf = spatial_embeddings(model, torch.stack([pre.eval(img) for img, _ in batch]))
        emb = F.normalize(emb.float(), dim=-1).cpu()
        seconds += time.perf_counter() - t0
        grid, how, exact = sf.grid, sf.how, sf.exact
        for b, (img, boxes) in enumerate(batch):
            lay = layouts[start + b]
            here = [dataset.classnames[dataset.labels[i]] for i in lay.items]
            maps = torch.einsum("hwd,td->thw", emb[b], torch.stack([weights[n] for n in here]).float()).numpy()
            trials = score(maps, here, boxes, crop, canvas, scale)
            for t, i in zip(trials, lay.items):
                t["collage"], t["image"] = start + b, str(getattr(dataset.records[i], "key", i))
            result.trials += trials
            if start + b < show:
                result.shown.append((img, trials, maps))
        if progress:
            print(f"pointing: {min(start + batch_size, collages)}/{collages} collages", end="\r", flush=True)
    result.metrics = {**summarize(result.trials), "collages": collages, "map_shape": list(grid), "exact": exact,
                      "how": how, "seconds_per_map": seconds / collages,
                      "by_count": {str(k): summarize([t for t in result.trials if t["count"] == k])
                                   for k in range(counts[0], counts[1] + 1)}}
    return result


def save_pointing_figure(result: PointingResult, path, canvas: int):
    """``path``: a row per shown collage -- the collage with its boxes, then each name's map over it (its peak
    green on a hit, red on a miss)."""
    from ..plots import draw_heat, pyplot, save_figure

    plt = pyplot("the pointing game's figure")
    rows = max(1, len(result.shown))
    cols = 1 + max((len(t) for _, t, _ in result.shown), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False)
    size = (canvas, canvas)
    for row, (img, trials, maps) in zip(axes, result.shown):
        draw_heat(row[0], img, None, result.crop, size, f"collage {trials[0]['collage']}",
                  boxes=[t["box"] for t in trials])
        for ax, t, heat in zip(row[1:], trials, maps):
            draw_heat(ax, img, heat, result.crop, size, t["name"][:28], point=t["point"], hit=t["hit"],
                      boxes=[t["box"]])
        for ax in row[1 + len(trials):]:
            ax.axis("off")
    m = result.metrics
    fig.suptitle(f"pointing game: {m['pointing_accuracy']:.1%} of {m['trials']} names hit (centre "
                 f"{m['centre_baseline']:.1%}, random cell {m['random_baseline']:.1%})", fontsize=10)
    return save_figure(fig, path, dpi=90)
