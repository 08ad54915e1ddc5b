"""The emoji dataset's ``datacard.md``: what was drawn, by whom, under which licence, and how it splits."""

from __future__ import annotations

from typing import Sequence

from ..output import markdown_table, reason_counts


def datacard(m: dict, skipped: Sequence[tuple[str, str, str]]) -> str:
    """The datacard of manifest ``m``; ``skipped`` are the ``skipped.tsv`` rows, counted by reason."""
    c = m["counts"]
    design_rows = [(d, v["title"], v["family"], v["split"], v["images"], v["license"],
                    f'{v["package"]}@{v["version"]}', v["matched_by"]) for d, v in m["designs"].items()]
    eval_rows = [(s, v["images"], v["classes"], ", ".join(v["designs"])) for s, v in c["eval"].items()]
    return f"""# Emoji in many designs (littune data emoji)

One image per (emoji concept, design): {c['images']} images of {c['concepts']} concepts in
{len(m['designs'])} designs, drawn from the npm Iconify icon sets and named with emojibase-data
{m['emojibase']['version']} (MIT). Rendered at {m['size']} px on white with {', '.join(f'{k} {v}' for k, v in m['renderers'].items())}.
Seed {m['seed']}. Built in {m['build_seconds']} s.

## Designs

{markdown_table(("design", "title", "family", "split", "images", "licence", "package", "matched by"), design_rows)}

Held-out design families (never trained on): {', '.join(m['heldout_families']) or 'none'}.
Sets that hold the same or derived art are one family, so a held-out family is held out whole.
The licences are those of each icon set: attribute CC-BY sets and share CC-BY-SA derivatives alike.

## Splits

- `train.csv`: {c['train_images']} images of {c['train_concepts']} concepts in the training designs, {c['train_rows']} rows
  (one per caption variant).
- `val.csv`: {c['val_images']} images ({m['val_fraction']:.0%} of the training designs' images of training concepts,
  by seeded hash), {c['val_rows']} rows. The concepts also appear in train.csv in other designs.
- Held-out concepts: {c['heldout_concepts']} concepts ({m['heldout_concept_fraction']:.0%} per emoji group) never
  in train or val, in any design or caption.

Evaluation folders (`eval/<split>/<concept>/<design>.png` + `classnames.txt`, and
`eval/retrieval_<split>.csv` with English captions):

{markdown_table(("split", "images", "classes", "designs"), eval_rows)}

## Captions

The CLDR name, with an article, with "emoji", and the tags joined (when that string names one
concept){'; plus names and tags in ' + ', '.join(m['langs']) if m['langs'] else ''}.

## Skipped ({c['skipped']}, see skipped.tsv)

{markdown_table(("reason", "count"), reason_counts(skipped))}
"""
