"""The paper's design-choice study at small scale: which towers to lock, which to pre-train.

LiT (Zhai et al. 2021, Sec. 4 and Fig. 3) compares the tower settings -- first letter the image tower,
second the text tower; ``L`` pre-trained and locked, ``U`` pre-trained and unlocked, ``u`` random and
unlocked -- at an equal number of steps and finds ``Lu`` and ``LU`` best for zero-shot transfer, the
unlocked pre-trained image tower (``Uu``, ``UU``) behind them, ``uu`` (CLIP-style from scratch) far behind,
and ``LL`` (only the heads trained) weak. This module reruns that question on the emoji data:

* the same data (the emoji training captions), the same steps and batch, the same evaluation
  (zero-shot on held-out designs, held-out concepts and both; text<->image retrieval on their captions);
* image tower EfficientNet-Lite0 (ImageNet) run at ``image_size`` px for every setting (128 by default,
  so that the unlocked settings, which run the tower forward and backward on every step, fit a CPU);
  locked settings read the embedding cache of that same tower at that same size;
* text tower: a transformer from scratch for ``u``; all-MiniLM-L6-v2 for ``U`` and ``L``;
* pre-trained unlocked towers train at 0.1x the learning rate (the paper's advice for fine-tuning;
  set here for both towers, littune's default for the text tower alone), the pre-trained text tower's
  word embeddings frozen (littune's default: ``optim.lr_mults.text_embeddings`` 0); the heads and
  the from-scratch towers at 1x. Unlocked image towers see the same un-augmented pixels
  as the cache holds, so the data is the same for every setting.
* ``Lu-Uu`` (:data:`DELAYED`) is the paper's other answer, unlocking the image tower later and slower:
  ``Uu`` whose image tower is held locked for the first half of the steps (``Lu``: no gradient, eval
  mode; it still runs on the pixels every step) and then ramps up over a warm-up's length of steps to
  the same 0.1x multiplier (``optim.unlock``, :func:`unlock_schedule`). The name has no ``>`` so that
  it can be typed unquoted in a shell.

Writes ``study.md``, ``study.json`` and ``study.png`` (one plot) in the output folder; every setting's run
(model, metrics, plots) lives in ``runs/<setting>`` and a finished setting is reused on a second run.
The data, caches, evaluation and baselines are :mod:`littune.studies.benchmark`, shared with the quickstart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import benchmark as bench

SETTINGS = ("Lu", "LU", "Uu", "UU", "uu", "LL")
#: The study's delayed-unlocking settings: name -> the tower setting it ends in.
DELAYED = {"Lu-Uu": "Uu"}
MINILM = {"type": "hf", "path": "minilm", "pooling": "mean", "context_length": 32}


def study_setting(name: str) -> str:
    """The tower setting a study setting trains (``Lu-Uu`` -> ``Uu``; ``Lu`` -> ``Lu``); a clear error
    for a name that is neither."""
    from ..errors import LittuneError
    from ..model.settings import parse_setting

    if name in DELAYED:
        return DELAYED[name]
    try:
        parse_setting(name)
    except ValueError as e:
        raise LittuneError(f"{e}; the study also runs {', '.join(DELAYED)} (delayed unlocking)") from None
    return name


def unlock_schedule(steps: int) -> dict:
    """``optim.unlock`` of a delayed setting: the image tower held for the first half of the steps, then
    ramped to its multiplier over as many steps as the warm-up (``steps // 10``, at least 1)."""
    return {"image": {"after": steps // 2, "ramp": max(1, steps // 10)}}


def setting_overrides(setting: str, paths: dict, run_dir: Path, steps: int, batch: int, image_tower: dict,
                      text_towers: dict | None = None, embed_dim: int = 256) -> list[str]:
    """``littune train --set`` overrides for one setting of the study.

    ``text_towers``: ``{"scratch": spec, "pretrained": spec}`` (default: the quickstart's transformer
    and all-MiniLM-L6-v2).
    """
    trained = study_setting(setting)
    image_letter, text_letter = trained[0], trained[1]
    towers = {"scratch": bench.TEXT_TOWER, "pretrained": MINILM, **(text_towers or {})}
    text = towers["pretrained"] if text_letter in "UL" else towers["scratch"]
    mults = {"image": 0.1 if image_letter == "U" else 1.0, "text": 0.1 if text_letter == "U" else 1.0}
    out = [
        f"model.setting={trained}", f"model.image_tower={json.dumps(image_tower)}",
        f"model.text_tower={json.dumps(text)}", f"model.embed_dim={embed_dim}",
        f"data.source={paths['data'] / 'train.csv'}", f"run_dir={run_dir}", f"steps={steps}",
        f"data.batch_size={batch}", "optim.lr=1e-3", "optim.weight_decay=1e-4", f"optim.lr_mults={json.dumps(mults)}",
        f"schedule.warmup_steps={max(1, steps // 10)}", "log_every=10", f"checkpoint_every={max(50, steps // 4)}",
        "data.augment=false", "data.workers=1",
    ]
    if image_letter == "L":
        out.append(f"data.cache={paths['train']}")
    if setting in DELAYED:
        out.append(f"optim.unlock={json.dumps(unlock_schedule(steps))}")
    return out


def run_setting(setting: str, paths: dict, out: Path, steps: int, batch: int, image_tower: dict,
                progress: bool = True, **tower_options) -> dict:
    """Train one setting (or reuse a finished run) and evaluate it; returns its row of the table."""
    from ..config import load_config
    from ..model.two_towers import LiTModel
    from ..train.trainer import Trainer

    run_dir = out / "runs" / setting
    done = run_dir / "study_eval.json"
    if done.is_file():
        bench.say(f"study {setting}: finished earlier, reusing {run_dir}")
        return json.loads(done.read_text())
    cfg = load_config(overrides=setting_overrides(setting, paths, run_dir, steps, batch, image_tower, **tower_options))
    cfg.progress = progress
    bench.say(f"study {setting}: training {steps} steps of {batch} pairs in {run_dir}")
    t0 = time.time()
    Trainer(cfg).run()
    train_s = time.time() - t0
    model = LiTModel.from_pretrained(run_dir / "model", trust_code=True).eval()  # trained just now, from the study's config
    metrics = bench.evaluate(model, paths, locked=model.setting.image.locked, progress=progress)
    log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    trainable = sum(p.numel() for g in model.param_groups(cfg.optim.lr_mults) if not g["frozen"]
                    for p in g["params"])  # frozen word embeddings are not
    row = {"setting": setting, "metrics": metrics, "train_seconds": round(train_s, 1),
           "final_loss": float(np.mean([r["loss"] for r in log[-3:]])) if log else None,
           "trainable_params": trainable, "pairs_per_s": log[-1].get("pairs_per_s") if log else None,
           "commit": bench.code_commit()}
    done.write_text(json.dumps(row, indent=2))
    return row


def markdown(rows: list[dict], baselines: dict) -> str:
    splits = [s for s in bench.SPLITS if any(s in r["metrics"] for r in rows)]
    head = ["setting", "commit", "trainable params", "train s", "final loss"]
    head += [f"{s} top-1" for s in splits] + [f"{s} text→image R@1" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, base in baselines.items():
        cells = [name, "", "", "", ""] + [bench.fmt(base.get(s)) for s in splits] + ["" for _ in splits]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        m = r["metrics"]
        cells = [f"**{r['setting']}**", r.get("commit") or "?", f"{r['trainable_params'] / 1e6:.1f}M",
                 f"{r['train_seconds']:.0f}", bench.fmt(r["final_loss"])]
        cells += [bench.fmt(m.get(s, {}).get("acc1")) for s in splits]
        cells += [bench.fmt(m.get(f"{s}_retrieval", {}).get("image_retrieval_recall@1")) for s in splits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], baselines: dict, path: Path) -> Path | None:
    """Grouped bars: zero-shot top-1 per held-out split for every setting, chance and ceiling as marks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    splits = [s for s in bench.SPLITS if any(s in r["metrics"] for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(rows))
    for k, s in enumerate(splits):
        vals = [r["metrics"].get(s, {}).get("acc1", 0.0) for r in rows]
        bars = ax.bar(x + (k - (len(splits) - 1) / 2) * width, vals, width, label=s.replace("_", " "))
        for name, base in baselines.items():
            if base.get(s) is not None:
                ax.axhline(base[s], color=bars.patches[0].get_facecolor(), lw=0.8,
                           ls=":" if name.startswith("chance") else "--")
    ax.set_xticks(x, [r["setting"] for r in rows])
    ax.set_ylabel("zero-shot top-1")
    ax.set_title("LiT tower settings on emoji (dashed: image-only prototype ceiling, dotted: chance)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_study(out: str | Path = "out/study", settings=SETTINGS, steps: int = 200, batch: int = 64,
              image_size: int = 128, quick: bool = False, progress: bool = True) -> dict:
    """Run every setting and write ``study.md``, ``study.json`` and ``study.png`` in ``out``."""
    for s in settings:
        study_setting(s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_tower = {"type": "efficientnet-lite", "name": "efficientnet-lite0", "image_size": int(image_size)}
    tag = f"efficientnet-lite0@{int(image_size)}"
    paths = bench.prepare(out, quick, tower=tag, progress=progress)
    t0 = time.time()
    rows = [run_setting(s, paths, out, steps, batch, image_tower, progress) for s in settings]
    baselines = {"chance": {}, "image-only prototype (seen concepts)": {}}
    for split, info in paths["eval"].items():
        baselines["chance"][split] = bench.chance(info["classnames"])
        proto = bench.prototype_baseline(paths["train"], info["cache"])
        baselines["image-only prototype (seen concepts)"][split] = proto["acc1"] if proto else None
    c = paths["manifest"]["counts"]
    header = (f"Tower settings at equal steps: {steps} steps of {batch} pairs, EfficientNet-Lite0 at {image_size} px, "
              f"text transformer {bench.TEXT_TOWER['depth']}x{bench.TEXT_TOWER['width']} from scratch (u) or "
              f"all-MiniLM-L6-v2 (U, L; U: its word embeddings frozen); "
              f"emoji {c['train_images']} training images of {c['train_concepts']} concepts. "
              f"Zero-shot with the 'emoji' prompt ensemble; retrieval: any design of the caption's concept counts. "
              f"Each row names the littune commit that trained it; this table written at {bench.code_commit()}, "
              f"{time.time() - t0:.0f} s of training and evaluation in this call.")
    for name in (s for s in settings if s in DELAYED):
        u = unlock_schedule(steps)["image"]
        header += (f" {name}: {DELAYED[name]} with its image tower held locked for the first {u['after']} steps, "
                   f"then ramped over {u['ramp']} steps to the 0.1x multiplier.")
    table = markdown(rows, baselines)
    (out / "study.md").write_text(header + "\n\n" + table + "\n", encoding="utf-8")
    (out / "study.json").write_text(json.dumps({"header": header, "steps": steps, "batch": batch,
                                                "image_size": image_size, "rows": rows, "baselines": baselines},
                                               indent=2))
    png = plot(rows, baselines, out / "study.png")
    print("\n" + header + "\n\n" + table + "\n")
    print(f"table: {out / 'study.md'}  json: {out / 'study.json'}" + (f"  plot: {png}" if png else ""))
    return {"rows": rows, "baselines": baselines, "table": table}
