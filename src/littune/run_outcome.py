"""How a ``littune train`` run ends, as its user sees it.

* :func:`print_results`: the final validation results (``results.json``) as a table, each retrieval
  recall with its direction (:func:`littune.eval.names.metric_label`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .eval.names import for_stream, metric_label

#: the columns of the validation table (every metric is in results.json)
COLUMNS = ("acc1", "acc5", "image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
           "text_retrieval_recall@5")


def validation_table(results: dict) -> str:
    """``{set: metrics}`` as an aligned text table: one row a validation set, one column a metric of
    :data:`COLUMNS` that some set has (``-`` where a set has not); empty without such metrics."""
    keys = [k for k in COLUMNS if any(isinstance(m, dict) and k in m for m in results.values())]
    if not keys:
        return ""
    rows = [["validation set", *(metric_label(k) for k in keys)]]
    for name, metrics in results.items():
        rows.append([str(name), *(f"{metrics[k]:.3f}" if isinstance(metrics.get(k), (int, float)) else "-"
                                  for k in keys)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def print_results(run_dir: Path, stream=None) -> None:
    """Print the run's final validation results (``results.json``) as a table; nothing without them."""
    stream = stream or sys.stdout
    path = Path(run_dir) / "results.json"
    table = validation_table(json.loads(path.read_text())) if path.is_file() else ""
    if table:
        print(for_stream(f"final validation (every metric in {path}):\n{table}", stream), file=stream)
