"""Which text tower the main job trains, chosen at (about) equal training wall time.

The question of issue 22, on the main job's own data, caches and evaluation (:mod:`littune.studies.quickstart`):
a text transformer from scratch (``Lu``, the main job until then), all-MiniLM-L6-v2 unlocked (``LU``,
English only), multilingual-e5-small unlocked (``LU``) and multilingual-e5-small locked (``LL``: each
caption's features computed once into a text cache, only the two linear heads train). A pre-trained
tower costs about 7x the compute of the small one from scratch (e5-small), so each row gets the steps
its wall time allows rather than the same steps: the table reports the seconds each row trained
(caption features included) and the held-out figures in English and in the 26 other languages.

Every row runs :func:`littune.studies.quickstart.run_quickstart` with its own recipe and run name in the main
job's folder (default ``out/quickstart``: its data and image caches are reused, and a finished row is
read back, not trained again). Writes ``text-towers.md`` and ``text-towers.json`` there.

    python -m littune.studies.text_study [--out out/quickstart] [--rows LL-e5,LU-e5,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from . import benchmark as bench
from .quickstart import DEFAULT_RECIPE, E5_TEXT_TOWER, RECIPES, Recipe, run_quickstart

MINILM_TEXT_TOWER = {"type": "hf", "path": "minilm", "pooling": "mean", "context_length": 32}
#: the study's rows beside the main job's recipes: unlocked pre-trained towers at the 0.1 text
#: learning-rate multiplier of the design-choice study, their word embeddings frozen, for about the
#: wall time of the LL row
ROWS = {
    **RECIPES,
    "LL-e5-en0.5-d256": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.5},
                               caption_budget={"en": 8, "*": 2}),
    "LL-e5-en0.5-d256-mlp": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.5},
                                   caption_budget={"en": 8, "*": 2}, text_head="mlp"),
    "LL-e5-en0.9-d256": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.9},
                               caption_budget={"en": 8, "*": 2}),
    "LL-e5-en0.95-d256": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.95},
                                caption_budget={"en": 8, "*": 2}),
    "LL-e5-en0.9-d384": Recipe("LL", E5_TEXT_TOWER, steps=2000, batch=1024, language_share={"en": 0.9},
                               caption_budget={"en": 8, "*": 2}, embed_dim=384),
    "LU-minilm": Recipe("LU", MINILM_TEXT_TOWER, steps=480, batch=64, lr_mults={"text": 0.1}),
    "LU-e5": Recipe("LU", E5_TEXT_TOWER, steps=60, batch=64, lr_mults={"text": 0.1}, language_share={"en": 0.5}),
}
COLUMNS = ("heldout_designs_acc1", "heldout_concepts_acc1", "heldout_concepts_t2i_r1")


def study_row(key: str, result: dict) -> dict:
    """The figures of one finished row."""
    s = result["language_summary"]
    en = s["en"] or {}
    row = {"row": key, "setting": result.get("setting", "Lu"), "text_tower": result.get("text_tower"),
           "steps": result["steps"], "batch": result["batch"],
           "commit": (result.get("phases") or {}).get("trained_at") or result["commit"],
           "train_seconds": (result.get("phases") or {}).get("train"), "language_share": result["language_share"],
           "caption_budget": result.get("caption_budget") or {},
           "openclipart_t2i_r1": result["openclipart_test"].get("image_retrieval_recall@1")}
    main = {r["split"]: r for r in result.get("rows", [])}
    row["designs_acc1_ensemble"] = main.get("heldout_designs", {}).get("acc1")  # the main table's, 'emoji' prompts
    for col in COLUMNS:
        row[f"en_{col}"] = en.get(col)
        row[f"others_{col}"] = s.get(f"mean_other_{col}")
    en_r1, other_r1 = row["en_heldout_concepts_t2i_r1"], row["others_heldout_concepts_t2i_r1"]
    row["others_over_en_t2i"] = other_r1 / en_r1 if en_r1 and other_r1 is not None else None
    return row


def markdown(rows: list[dict]) -> str:
    head = ["row", "setting", "text tower", "steps x batch", "train s", "commit", "designs top-1 (prompt ensemble)",
            "en designs top-1",
            "en concepts top-1", "en concepts text→image R@1", "Openclipart text→image R@1", "others designs top-1",
            "others concepts top-1", "others concepts text→image R@1", "others / en (text→image R@1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tower = r["text_tower"] or {}
        name = tower.get("path") or f"scratch {tower.get('depth')}x{tower.get('width')}"
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "?"
        cells = [f"**{r['row']}**", r["setting"], str(name), f"{r['steps']} x {r['batch']}", secs, r["commit"],
                 bench.fmt(r.get("designs_acc1_ensemble")),
                 bench.fmt(r["en_heldout_designs_acc1"]), bench.fmt(r["en_heldout_concepts_acc1"]),
                 bench.fmt(r["en_heldout_concepts_t2i_r1"]), bench.fmt(r["openclipart_t2i_r1"]),
                 bench.fmt(r["others_heldout_designs_acc1"]), bench.fmt(r["others_heldout_concepts_acc1"]),
                 bench.fmt(r["others_heldout_concepts_t2i_r1"]), bench.fmt(r["others_over_en_t2i"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_text_study(out: str | Path = "out/quickstart", rows=tuple(ROWS), progress: bool = True) -> dict:
    """Train (or read back) every row; write ``text-towers.md`` / ``.json`` in ``out``."""
    from ..errors import LittuneError

    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise LittuneError(f"--rows: unknown row {unknown[0]!r}; choose from {','.join(ROWS)}")
    out, found = Path(out), []
    for key in rows:
        bench.say(f"text study: {key}")
        name = "run" if key == DEFAULT_RECIPE else f"study-{key}"  # the main job's own run is its row
        result = run_quickstart(out, recipe=ROWS[key], run_name=name, progress=progress)
        found.append(study_row(key, result))
    table = markdown(found)
    (out / "text-towers.md").write_text(table + "\n", encoding="utf-8")
    (out / "text-towers.json").write_text(json.dumps({"rows": found, "recipes": {k: asdict(ROWS[k]) for k in rows}},
                                                     indent=2, ensure_ascii=False))
    print("\n" + table)
    return {"rows": found, "table": table}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m littune.studies.text_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/quickstart", help="the main job's folder (default out/quickstart)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    args = ap.parse_args(argv)
    run_text_study(args.out, [r for r in args.rows.split(",") if r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
