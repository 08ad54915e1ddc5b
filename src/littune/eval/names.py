"""What each metric is called where a person reads it: every retrieval recall with its direction.

The keys (CLIP_benchmark's, kept in results files, JSON and TensorBoard) name what is *retrieved*:
``image_retrieval_recall@K`` is **text→image** recall (each caption is a query, the images are
ranked), ``text_retrieval_recall@K`` is **image→text** (each image is a query over the captions).
Tables, plots, the eval command and the end of ``littune train`` print :func:`metric_label` instead.
"""

from __future__ import annotations

import re

RECALL = re.compile(r"(image|text)_retrieval_recall@(\d+)$")
TOPK = re.compile(r"acc(\d+)$")
#: the direction of each retrieval key's queries, by what the key says is retrieved
DIRECTION = {"image": "text→image", "text": "image→text"}
OTHER = {"mean_per_class_recall": "mean per-class recall"}


def metric_label(key: str) -> str:
    """``image_retrieval_recall@1`` -> ``text→image R@1``, ``text_retrieval_recall@5`` -> ``image→text R@5``,
    ``acc1`` -> ``zero-shot top-1``; any other key is returned as it is."""
    found = RECALL.match(key)
    if found:
        return f"{DIRECTION[found.group(1)]} R@{found.group(2)}"
    found = TOPK.match(key)
    if found:
        return f"zero-shot top-{found.group(1)}"
    return OTHER.get(key, key)


def for_stream(text: str, stream) -> str:
    """``text`` with its arrows as ``->`` where ``stream`` cannot encode ``→`` (an ASCII or Latin-1 terminal)."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        "→".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return text.replace("→", "->")
    return text
