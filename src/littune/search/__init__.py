"""Search an image collection by text or by image: an index of embeddings and exact top-k search.

``littune index`` embeds a collection once with a trained model and writes an **index directory**
(:func:`build_index`, files listed in :mod:`littune.search.index`): the float16 normalised image
embeddings, each image's key, where it lives and how to open it again through its source
(:mod:`littune.search.originals`), and ``index.json`` with the model's *embedding fingerprint*.

**Search** (:func:`topk_search`, :mod:`littune.search.topk`) is brute force and exact, scanning the
memory-mapped embeddings in chunks; beyond a few million items an optional FAISS index
(:mod:`littune.search.faiss_backend`, ``pip install faiss-cpu``) searches ``faiss.index`` instead.
:class:`SearchIndex` opens a directory, checks a model against it and answers text and image queries.
"""

from .build import build_index
from .index import (EMBEDDINGS_NAME, FAISS_NAME, INDEX_FORMAT, INDEX_VERSION, ITEMS_NAME, META_NAME, SKIPPED_NAME,
                    Hit, SearchIndex, embedding_fingerprint)
from .topk import DEFAULT_CHUNK_ROWS, topk_search

__all__ = ["DEFAULT_CHUNK_ROWS", "EMBEDDINGS_NAME", "FAISS_NAME", "INDEX_FORMAT", "INDEX_VERSION", "ITEMS_NAME",
           "META_NAME", "SKIPPED_NAME", "Hit", "SearchIndex", "build_index", "embedding_fingerprint", "topk_search"]
