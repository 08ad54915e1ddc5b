"""Search an index (from `littune index`) by text or by example image.

Each text query is embedded with the model's text tower, each --image query with its image tower,
and the closest images are printed with their cosine similarity, best first. The model is the one
recorded in the index unless --model names another (it must make the same image embeddings).
The search is exact (brute force over the index in chunks) unless the index has a FAISS index and
--backend auto or faiss is used.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import add_trust_code

HELP = "search an index by text or by image"
EXAMPLE = 'littune search --index photos.index "a red bicycle" -k 10'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("queries", nargs="*", metavar="TEXT", help="text queries")
    p.add_argument("--index", "-i", required=True, metavar="INDEX", help="an index directory from littune index")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image query (repeatable)")
    p.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--model", "-m", metavar="DIR", help="the model (default: the one the index records)")
    p.add_argument("--backend", choices=("auto", "exact", "faiss"), default="auto",
                   help="exact brute force, FAISS when the index has one, or auto (default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    add_trust_code(p)


def run(args) -> int:
    from ..errors import LittuneError
    from ..search import SearchIndex

    if not args.queries and not args.image:
        raise LittuneError('nothing to search for: give a text query ("a red bicycle") or --image FILE')
    if any(not q.strip() for q in args.queries):
        raise LittuneError("a text query is empty")
    if args.k < 1:
        raise LittuneError(f"-k must be at least 1, not {args.k}")
    index = SearchIndex.open(args.index)
    backend = index.backend(args.backend)  # fail early on an unusable backend
    model = index.load_model(args.model, trust_code=args.trust_code)
    results = []
    if args.queries:
        for q, hits in zip(args.queries, index.search_text(model, args.queries, k=args.k, backend=backend)):
            results.append(("text", q, hits))
    if args.image:
        for q, hits in zip(args.image, index.search_image(model, args.image, k=args.k, backend=backend)):
            results.append(("image", q, hits))
    if args.json:
        json.dump([{"query": q, "kind": kind,
                    "hits": [{"rank": h.rank, "score": round(h.score, 6), "path": h.where, "key": h.key} for h in hits]}
                   for kind, q, hits in results], sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    for n, (kind, q, hits) in enumerate(results):
        if n:
            print()
        print(f"{kind}: {q}")
        for h in hits:
            print(f"  {h.rank:>3}  {h.score:.4f}  {h.where}")
    return 0
