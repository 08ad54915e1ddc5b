"""Which image head the main job trains: the attention head over cached tokens or the linear head, at equal
training wall time (issue 25, item 3).

The main job (:mod:`littune.studies.quickstart`, recipe ``LL-e5``) trains two linear heads over a locked
EfficientNet-Lite0 and a locked e5-small, 2,000 steps of 1,024 from two caches. ``model.image_head=attention``
(:mod:`littune.model.heads`) reads the tower's 7 x 7 x 1280 map instead of its pooled vector, so each step reads
49x the image bytes and runs the pooling: it costs more a step. Each attention row therefore gets the steps the
linear head's training time buys it: ``steps = 2000 x linear s/step / attention s/step``, both measured here,
in the same session, by short runs alternated ``--rounds`` times (the machine is shared and noisy).

Everything else is the main job's ``run/config.yaml`` as it is (learning rate, text cache, English share,
caption budget, the dedup exclusion), except the warm-up, a fraction of the steps (``warmup_fraction`` 0.1:
the linear run's 200 of 2,000), and the image caches, which are token caches of the same sources
(``littune embed SOURCE --tokens [GRID]``, made here once, under ``OUT/caches/tok7`` or ``tok4``). The linear
row is the main job's own run (``QUICKSTART/run/results.json``, not trained again).

Writes ``OUT/head-study.md`` and ``OUT/head-study.json``; a finished row is read back, not trained again.

    python -m littune.studies.head_study [--quickstart out/quickstart] [--out out/head-study]
                                         [--rows attention,attention-b256] [--rounds 2] [--timing-steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from . import benchmark as bench

#: the main job's caches, each embedded again with tokens (train first: every row needs it)
SPLITS = ("train", "heldout_designs", "heldout_concepts", "heldout_both", "openclipart_test")
#: steps that time a row (after the first); a metrics line every TIMING_LOG steps
TIMING_LOG = 10


@dataclass(frozen=True)
class Row:
    """One configuration: the image head, the batch, and for the attention head the token grid (None: the
    tower's own, 7 x 7 for EfficientNet-Lite0) and transformer blocks before the pooling; ``steps``: a fixed
    step count instead of the linear head's wall time (a control)."""

    head: str = "attention"
    batch: int = 1024
    grid: int | None = None
    blocks: int = 0
    steps: int | None = None


#: the main job's linear head (its own run) and the attention rows
ROWS = {
    "linear": Row("linear"),
    "attention": Row("attention"),
    "attention-b256": Row("attention", batch=256),
    "attention-g4": Row("attention", grid=4),
    # the control: the linear head at attention-b256's calibrated steps and batch (same pairs seen)
    "linear-b256": Row("linear", batch=256, steps=729),
}


def token_caches(out: Path, grid: int | None) -> Path:
    """The folder of the token caches of ``grid`` (``tok7``: the tower's own grid)."""
    return out / "caches" / f"tok{grid or 7}"


def main_config(quickstart: Path) -> dict:
    """The main job's training configuration, as its run wrote it."""
    from ..errors import LittuneError

    path = quickstart / "run" / "config.yaml"
    if not path.is_file():
        raise LittuneError(f"{path}: no main job's run here (make quickstart first)")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def embed_token_caches(cfg: dict, out: Path, grid: int | None, progress: bool = True) -> dict:
    """Embed, with tokens, the source of each of the main job's image caches (its manifest's ``source``)
    into ``token_caches(out, grid)``; one already complete is kept. Returns ``{split: seconds}``."""
    from ..cache import embed_source

    pooled, seconds = Path(cfg["data"]["cache"]).parent, {}
    for split in SPLITS:
        dest = token_caches(out, grid) / split
        if (dest / "manifest.json").is_file():
            continue
        source = json.loads((pooled / split / "manifest.json").read_text(encoding="utf-8"))["source"]
        bench.say(f"embed: littune embed {source} --out {dest} --tokens{f' {grid}' if grid else ''}")
        t0 = time.perf_counter()
        embed_source(source, cfg["model"]["image_tower"], dest, tokens=grid or True, progress=progress)
        seconds[split] = round(time.perf_counter() - t0, 1)
    return seconds


def overrides(row: Row, cfg: dict, out: Path, run_dir: Path, steps: int, validate: bool = True) -> list[str]:
    """The ``--set`` items that make ``row``'s run of ``steps`` steps from the main job's configuration
    (``validate=False``: no validation, no checkpoint before the end, a metrics line every TIMING_LOG steps:
    a timing run)."""
    items = [f"run_dir={run_dir}", f"steps={steps}", f"data.batch_size={row.batch}", "schedule.warmup_steps=null",
             f"model.image_head={row.head}", f"val.every={steps}"]
    zeroshot, retrieval = cfg["val"]["zeroshot"], cfg["val"]["retrieval"]
    if row.head == "attention":
        tokens = token_caches(out, row.grid)
        items += [f"data.cache={tokens / 'train'}", f"model.image_head_blocks={row.blocks}"]
        zeroshot = [{**v, "cache": str(tokens / Path(v["cache"]).name)} for v in zeroshot]
        retrieval = [{**v, "cache": str(tokens / Path(v["cache"]).name)} for v in retrieval]
    if not validate:
        zeroshot, retrieval = [], []
        items += [f"log_every={TIMING_LOG}", "checkpoint_every=0", "progress=false"]
    return items + [f"val.zeroshot={json.dumps(zeroshot)}", f"val.retrieval={json.dumps(retrieval)}"]


def train(config: Path, items: list[str]) -> Path:
    """``littune train --config CONFIG --set ITEM ...``, in this process; returns the run folder."""
    from ..config import load_config
    from ..train.trainer import Trainer

    cfg = load_config(config, items)
    Trainer(cfg).run()
    return Path(cfg.run_dir)


def step_seconds(metrics: Path, batch: int, skip_first: bool = True) -> list[float]:
    """Seconds a step over each metrics interval (``pairs_per_s`` lines), the first (start-up) left out."""
    found, prev = [], 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "pairs_per_s" in rec:
            found.append(batch / rec["pairs_per_s"] if rec["step"] > prev else 0.0)
            prev = rec["step"]
    return found[1:] if skip_first else found


def train_seconds(metrics: Path, batch: int) -> float:
    """The seconds the run's steps took (from its throughput lines; start-up and validation not included)."""
    total, prev = 0.0, 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "pairs_per_s" in rec:
            total += (rec["step"] - prev) * batch / rec["pairs_per_s"]
            prev = rec["step"]
    return total


def time_rows(quickstart: Path, out: Path, keys, rounds: int, steps: int) -> dict:
    """``{key: median s/step}`` of each row's batch, from ``rounds`` timing runs of ``steps`` steps, the rows
    alternated within each round (so a busy minute of the machine falls on all of them)."""
    cfg, config = main_config(quickstart), quickstart / "run" / "config.yaml"
    found: dict = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys:
            run_dir = out / "timing" / f"{key}-{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            bench.say(f"timing {key}: {steps} steps of {ROWS[key].batch} (round {r + 1} of {rounds})")
            train(config, overrides(ROWS[key], cfg, out, run_dir, steps, validate=False))
            per_step = step_seconds(run_dir / "metrics.jsonl", ROWS[key].batch)
            found[key].append(statistics.median(per_step))
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {k: {"s_per_step": statistics.median(v), "rounds": v} for k, v in found.items()}


def session_timing(quickstart: Path, out: Path, keys, rounds: int, steps: int) -> dict:
    """:func:`time_rows`, kept in ``OUT/head-study-timing.json``: a study run again reads its timing back
    (so its rows keep their steps and are read back, not trained again); delete the file to time afresh."""
    path = out / "head-study-timing.json"
    kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if all(k in kept for k in keys):
        return kept
    out.mkdir(parents=True, exist_ok=True)
    kept = time_rows(quickstart, out, keys, rounds, steps)  # all of them again: one session's timing
    path.write_text(json.dumps(kept, indent=2), encoding="utf-8")
    return kept


def equal_steps(linear_steps: int, linear_s: float, row_s: float) -> int:
    """The steps that take ``row_s`` a step as long as ``linear_steps`` steps of ``linear_s``."""
    return max(1, round(linear_steps * linear_s / row_s))


def figures(results: dict) -> dict:
    """The table's figures of a run's ``results.json``."""
    both = lambda split: results.get(f"{split}_retrieval", {})  # noqa: E731
    return {"designs_acc1": results["heldout_designs"]["acc1"], "concepts_acc1": results["heldout_concepts"]["acc1"],
            "both_acc1": results["heldout_both"]["acc1"],
            "concepts_t2i_r1": both("heldout_concepts").get("image_retrieval_recall@1"),
            "concepts_i2t_r1": both("heldout_concepts").get("text_retrieval_recall@1"),
            "designs_t2i_r1": both("heldout_designs").get("image_retrieval_recall@1"),
            "openclipart_t2i_r1": both("openclipart_test").get("image_retrieval_recall@1"),
            "openclipart_i2t_r1": both("openclipart_test").get("text_retrieval_recall@1")}


def pointing(model_dir: Path, dataset: Path, collages: int, keep: Path | None = None) -> float | None:
    """The model's pointing-game accuracy (:mod:`littune.eval.pointing`) on ``dataset``'s collages (read back
    from ``keep``, a JSON file, where it was written before)."""
    from ..eval.pointing import play
    from ..eval.sets import class_folder
    from ..model.two_towers import LiTModel

    if not collages or not dataset.is_dir():
        return None
    if keep is not None and keep.is_file():
        return json.loads(keep.read_text(encoding="utf-8"))["pointing_accuracy"]
    model = LiTModel.from_pretrained(model_dir)
    metrics = play(model, class_folder(dataset), collages=collages, show=0).metrics
    if keep is not None:
        keep.write_text(json.dumps({k: v for k, v in metrics.items() if k != "by_count"}), encoding="utf-8")
    return metrics["pointing_accuracy"]


def chances(cfg: dict) -> dict:
    """Top-1 of a uniform guess on each zero-shot split."""
    return {v["name"]: bench.chance(v["classnames"]) for v in cfg["val"]["zeroshot"]}


def linear_row(quickstart: Path, out: Path, timing: dict, pointing_at: Path, collages: int) -> dict:
    """The main job's own run, as the linear row (its steps' seconds: those of this session's timing)."""
    cfg, run = main_config(quickstart), quickstart / "run"
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    steps, batch = cfg["steps"], cfg["data"]["batch_size"]
    record = json.loads((run / "quickstart.json").read_text(encoding="utf-8")) if (run / "quickstart.json").is_file() else {}
    return {"row": "linear", **asdict(ROWS["linear"]), "steps": steps, "s_per_step": timing["s_per_step"],
            "train_s": steps * timing["s_per_step"], "train_s_then": train_seconds(run / "metrics.jsonl", batch),
            "commit": record.get("commit", "?"), "pointing": pointing(run / "model", pointing_at, collages, out / f"pointing-linear-{collages}.json"),
            **figures(results)}


def attention_row(key: str, quickstart: Path, out: Path, steps: int, timing: dict, pointing_at: Path,
                  collages: int) -> dict:
    """Train (or read back: ``OUT/KEY-STEPS``) one row of ``steps`` steps; its figures. Its
    ``s_per_step`` is the run's own (train seconds / steps); ``timed_s_per_step`` the timing runs'."""
    row, run_dir = ROWS[key], out / f"{key}-{steps}"
    record_file = run_dir / "head-study-row.json"
    if not (run_dir / "results.json").is_file():
        embed_token_caches(main_config(quickstart), out, row.grid)
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
        commit, t0 = bench.code_commit(), time.perf_counter()
        timed = f" (timed at {timing['s_per_step']:.3g} s/step)" if timing["s_per_step"] else ""
        bench.say(f"train {key}: {steps} steps of {row.batch}{timed}")
        train(quickstart / "run" / "config.yaml", overrides(row, main_config(quickstart), out, run_dir, steps))
        record_file.write_text(json.dumps({"commit": commit, "wall_s": round(time.perf_counter() - t0, 1)}))
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    seconds = train_seconds(run_dir / "metrics.jsonl", row.batch)
    return {"row": key, **asdict(row), "steps": steps, "s_per_step": seconds / steps,
            "timed_s_per_step": timing["s_per_step"], "train_s": seconds, "commit": record.get("commit", "?"),
            "pointing": pointing(run_dir / "model", pointing_at, collages, run_dir / f"pointing-{collages}.json"),
            **figures(results)}


def matched_steps(budget_s: float, done: dict, tolerance: float = 0.2) -> int | None:
    """The steps that would have filled ``budget_s`` at the s/step a finished row ``done`` really ran at,
    where its training time missed the budget by more than ``tolerance`` (the machine's load changed
    between the timing and the run); None where it did not."""
    if abs(done["train_s"] - budget_s) <= tolerance * budget_s:
        return None
    return max(1, round(budget_s / done["s_per_step"]))


COLUMNS = (("designs_acc1", "designs top-1"), ("concepts_acc1", "concepts top-1"), ("both_acc1", "both top-1"),
           ("concepts_t2i_r1", "concepts text→image R@1"), ("concepts_i2t_r1", "concepts image→text R@1"),
           ("openclipart_t2i_r1", "Openclipart text→image R@1"), ("openclipart_i2t_r1", "Openclipart image→text R@1"),
           ("pointing", "pointing game"))


def markdown(rows: list[dict], chance: dict) -> str:
    """The table: one line a row, chance first."""
    head = ["row", "image head", "tokens", "steps x batch", "s/step", "train s", "commit"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    guess = {"designs_acc1": chance.get("heldout_designs"), "concepts_acc1": chance.get("heldout_concepts"),
             "both_acc1": chance.get("heldout_both")}
    lines.append("| chance | | | | | | | " + " | ".join(bench.fmt(guess[c]) if c in guess else ""
                                                     for c, _ in COLUMNS) + " |")
    for r in rows:
        grid = "pooled" if r["head"] != "attention" else f"{r['grid'] or 7}x{r['grid'] or 7}"
        cells = [f"**{r['row']}**", r["head"] + (f" +{r['blocks']} block" if r.get("blocks") else ""), grid,
                 f"{r['steps']} x {r['batch']}", f"{r['s_per_step']:.3g}", f"{r['train_s']:.0f}", r["commit"]]
        lines.append("| " + " | ".join(cells + [bench.fmt(r.get(c)) for c, _ in COLUMNS]) + " |")
    return "\n".join(lines)


def run_head_study(quickstart="out/quickstart", out="out/head-study", rows=("attention",), rounds: int = 2,
                   timing_steps: int = 30, collages: int = 200, calibrate: bool = True) -> dict:
    """Time the rows against the linear head, train each attention row for the linear head's training time
    (``calibrate``: and once more, at the steps its own run's speed allows, where its time missed that by more
    than 20%), write ``head-study.md`` / ``.json`` in ``out``."""
    from ..errors import LittuneError

    unknown = [r for r in rows if r not in ROWS or r == "linear"]
    if unknown:
        raise LittuneError(f"--rows: unknown row {unknown[0]!r}; choose from {','.join(k for k in ROWS if k != 'linear')}")
    quickstart, out = Path(quickstart), Path(out)
    cfg = main_config(quickstart)
    embedded = {f"tok{g or 7}": embed_token_caches(cfg, out, g) for g in dict.fromkeys(ROWS[k].grid for k in rows)}
    timing = session_timing(quickstart, out, ["linear", *(k for k in rows if ROWS[k].steps is None)], rounds,
                            timing_steps)
    linear_s, pointing_at = timing["linear"]["s_per_step"], Path(cfg["val"]["zeroshot"][0]["classnames"]).parent
    found = [linear_row(quickstart, out, timing["linear"], pointing_at, collages)]
    for key in rows:
        fixed, timed = ROWS[key].steps, timing.get(key, {"s_per_step": None})
        steps = fixed or equal_steps(cfg["steps"], linear_s, timed["s_per_step"])
        found.append(attention_row(key, quickstart, out, steps, timed, pointing_at, collages))
        again = matched_steps(found[0]["train_s"], found[-1]) if calibrate and not fixed else None
        if again is not None:  # once: the steps this row's own speed allows in the linear head's time
            found.append(attention_row(key, quickstart, out, again, timed, pointing_at, collages))
    table = markdown(found, chances(cfg))
    (out / "head-study.md").write_text(table + "\n", encoding="utf-8")
    (out / "head-study.json").write_text(json.dumps({"rows": found, "timing": timing, "embed_seconds": embedded,
                                                     "recipes": {k: asdict(ROWS[k]) for k in rows}}, indent=2))
    print("\n" + table)
    return {"rows": found, "table": table, "timing": timing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m littune.studies.head_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", default="out/quickstart", help="the main job's folder (default out/quickstart)")
    ap.add_argument("--out", default="out/head-study", help="where the token caches and runs go (default out/head-study)")
    others = ",".join(k for k in ROWS if k != "linear")
    ap.add_argument("--rows", default=others, help=f"rows to run beside the main job's linear head (default all: {others})")
    ap.add_argument("--rounds", type=int, default=2, help="timing runs of each row, alternated (default 2)")
    ap.add_argument("--timing-steps", type=int, default=30, help="steps of each timing run (default 30)")
    ap.add_argument("--collages", type=int, default=200, help="pointing-game collages (0: skip; default 200)")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="no second run of a row whose training time missed the linear head's by more than 20%%")
    args = ap.parse_args(argv)
    run_head_study(args.quickstart, args.out, [r for r in args.rows.split(",") if r], args.rounds,
                   args.timing_steps, args.collages, args.calibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
