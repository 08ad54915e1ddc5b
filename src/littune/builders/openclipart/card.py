"""The Openclipart dataset's ``datacard.md``: source, licence, splits, captions and what was skipped."""

from __future__ import annotations

from typing import Sequence

from ..output import markdown_table, reason_counts


def datacard(m: dict, skipped: Sequence[tuple[str, str, str]]) -> str:
    """The datacard of manifest ``m``; ``skipped`` are the ``skipped.tsv`` rows, counted by reason."""
    c = m["counts"]
    return f"""# Openclipart 0.18 (littune data openclipart)

{c['images']} drawings from Debian's `openclipart-svg`, rendered at {m['size']} px on white with
{', '.join(f'{k} {v}' for k, v in m['renderers'].items())} (resvg first, cairosvg for the files it rejects:
{m['render_counts']}). Seed {m['seed']}. Built in {m['build_seconds']} s.

Licence: Openclipart's public-domain dedication (Debian copyright file: "creative commons Public
Domain Dedication"). Licence URIs stated in the files: {m['licenses']}.

## Splits

Split {', '.join(f'{f:.0%}' for f in m['fractions'])} (train/val/test) by a seeded hash of the casefolded title
(the collection name for a series), so drawings that share a title stay in one split.
`retrieval_test.csv` has one caption per test image (title and keywords) and leaves out images
whose caption another test image has.

{markdown_table(("split", "images", "csv rows"), [
    ("train", c['train_images'], c['train_rows']), ("val", c['val_images'], c['val_rows']),
    ("test", c['test_images'], c['test_rows']), ("retrieval_test.csv", c['retrieval_test_rows'], c['retrieval_test_rows'])])}

Captions: the cleaned title, the title with its keywords, and the description when there is one
(descriptions shared by three or more files are boilerplate and dropped). A title shared by three or
more files is a collection name; those drawings are titled "<file name words> (<collection>)".
Titles are noisy and partly Italian or French. Drawings are cropped to their drawn pixels and
fitted with a 4% white margin.

Top-level categories: {', '.join(f'{k} {v}' for k, v in m['categories'].items())}.

## Skipped ({c['skipped']}, see skipped.tsv)

{markdown_table(("reason", "count"), reason_counts(skipped))}
"""
