"""Per-language evaluation: the same held-out images, asked about in each language.

For each language of the emoji set's per-language files (:mod:`littune.builders.emoji.languages`):

* **zero-shot top-1** on the held-out designs and on the held-out concepts, with the class names in
  that language and the bare name as the prompt (``"{}"``: the English prompt ensemble would favour
  English; the main table keeps it for English);
* **text->image R@1** on the held-out concepts' captions in that language (names and tags never
  trained on), any design of the caption's concept counting as a hit;

next to chance. Image embeddings are computed once per split (from its cache) and reused by every
language; only the texts are encoded per language. A language whose files hold no caption is
reported with ``None`` and a ``skipped`` reason instead of a score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

ZS_SPLITS = ("heldout_designs", "heldout_concepts")
RT_SPLIT = "heldout_concepts"
COLUMNS = ("heldout_designs_acc1", "heldout_concepts_acc1", "heldout_concepts_t2i_r1")


def _split_images(model, data_dir: Path, split: str, cache: Path):
    """``(embeddings, keys)`` of every image of a split, in the split table's order, read through its cache."""
    from ..inference.embeddings import image_embeddings
    from .sets import open_retrieval

    data = open_retrieval(data_dir / "eval" / f"retrieval_{split}.csv")
    emb, _, _ = image_embeddings(model, data.records, cache=cache)
    return emb, [r.key for r in data.records]


def _zeroshot(model, emb, keys: list[str], names_file: Path, memo: dict | None = None) -> tuple[float, float]:
    from .sets import folder_labels
    from .zeroshot import zeroshot_classifier, zeroshot_metrics

    names, labels = folder_labels(keys, names_file)
    weights = zeroshot_classifier(model, names, ["{}"], memo=memo).float().cpu()
    return zeroshot_metrics(emb @ weights.T, labels)["acc1"], 1 / len(names)


def _has_rows(table: Path) -> bool:
    """Whether a CSV has a data row under its header (reads two lines at most)."""
    if not table.is_file():
        return False
    with open(table, encoding="utf-8") as f:
        return bool(f.readline()) and bool(f.readline().strip())


def _retrieval(model, emb, split_keys: Sequence[str], table: Path, memo: dict | None = None) -> float | None:
    from ..inference.embeddings import text_embeddings
    from .retrieval import retrieval_metrics
    from .sets import folder_labels, open_retrieval

    if not _has_rows(table):
        return None
    data = open_retrieval(table)
    keys = [r.key for r in data.records]
    _, groups = folder_labels(keys)
    row = {k: i for i, k in enumerate(split_keys)}
    sub = emb[[row[k] for k in keys]]
    txt = text_embeddings(model, data.texts, memo=memo)
    return retrieval_metrics(sub, txt, data.text_to_image, image_groups=groups)["image_retrieval_recall@1"]


def language_scores(model, data_dir: Path, caches: dict[str, Path], langs: Sequence[str],
                    english_names: dict | None = None) -> list[dict]:
    """One row per language: the three scores, their chance levels and how many class names fell
    back to English (``english_names``: the builder's counts, ``{split: {lang: n}}``)."""
    from ..builders.emoji.languages import language_files

    images = {s: _split_images(model, data_dir, s, caches[s]) for s in ZS_SPLITS}
    rows = []
    # One memo for all: the held-out concepts' names are also names of the held-out designs, and languages
    # share texts (en and en-gb, es and es-mx): 52,348 distinct texts of the main job's 58,659.
    memo: dict = {}
    for lang in langs:
        row: dict = {"lang": lang}
        for s in ZS_SPLITS:
            names_file, _ = language_files(data_dir / "eval", s, lang)
            row[f"{s}_acc1"], row[f"{s}_chance"] = _zeroshot(model, *images[s], names_file, memo)
            row[f"{s}_english_names"] = (english_names or {}).get(s, {}).get(lang, 0)
        _, table = language_files(data_dir / "eval", RT_SPLIT, lang)
        row[f"{RT_SPLIT}_t2i_r1"] = _retrieval(model, *images[RT_SPLIT], table, memo)
        row[f"{RT_SPLIT}_t2i_chance"] = 1 / len(set(Path(k).parent.name for k in images[RT_SPLIT][1]))
        if row[f"{RT_SPLIT}_t2i_r1"] is None:
            row["skipped"] = f"no {RT_SPLIT} caption in {lang}"
        rows.append(row)
    return rows


def _cell(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def language_table(rows: list[dict]) -> str:
    """The markdown table of :func:`language_scores` (a summary line of the non-English mean first)."""
    head = ("| language | zero-shot top-1, held-out designs | held-out concepts | text→image R@1, held-out "
            "concepts | names in English (designs) |")
    lines = [head, "|---|---|---|---|---|"]
    r0 = rows[0] if rows else {}
    lines.append(f"| chance | {_cell(r0.get('heldout_designs_chance'))} | {_cell(r0.get('heldout_concepts_chance'))} "
                 f"| {_cell(r0.get('heldout_concepts_t2i_chance'))} | |")
    for r in rows:
        lines.append(f"| {r['lang']} | {_cell(r['heldout_designs_acc1'])} | {_cell(r['heldout_concepts_acc1'])} | "
                     f"{_cell(r['heldout_concepts_t2i_r1'])} | {r.get('heldout_designs_english_names', 0)} |")
    return "\n".join(lines)


def language_summary(rows: list[dict]) -> dict:
    """English's scores, the mean over the other languages, and the weakest language per column.
    English variants (``en-gb``: mostly the English names) do not count as other languages."""
    others = [r for r in rows if r["lang"] != "en" and not r["lang"].startswith("en-")]
    out = {"languages": len(rows), "en": next((r for r in rows if r["lang"] == "en"), None)}
    for col in COLUMNS:
        vals = [r[col] for r in others if r[col] is not None]
        out[f"mean_other_{col}"] = float(np.mean(vals)) if vals else None
        worst = min((r for r in others if r[col] is not None), key=lambda r: r[col], default=None)
        out[f"weakest_{col}"] = (worst["lang"], worst[col]) if worst else None
    return out


def language_plot(rows: list[dict], path: Path) -> Path | None:
    """A bar per language and score, chance as a dashed line: ``path`` (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..plots import save_figure

    labels = [r["lang"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 3.8))
    titles = ("zero-shot top-1, held-out designs", "zero-shot top-1, held-out concepts", "text→image R@1, held-out concepts")
    for k, (col, title) in enumerate(zip(COLUMNS, titles)):
        ax.bar(x + (k - 1) * 0.27, [r[col] or 0 for r in rows], width=0.27, label=title)
    ax.axhline(rows[0]["heldout_designs_chance"], color="k", ls="--", lw=0.8, label="chance (designs)")
    ax.set_xticks(x, labels, rotation=60, fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("One text tower, every language: held-out emoji asked about in each")
    return save_figure(fig, path, dpi=110)
