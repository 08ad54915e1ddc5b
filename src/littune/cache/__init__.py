"""The image-embedding cache: run a locked image tower over a source once, train from it forever.

With a locked image tower (the ``L`` of ``Lu``) the image features never change, so littune
computes them once. :func:`embed_source` (the library behind ``littune embed``) decodes a source's
images in worker processes, runs the tower in batches under ``torch.inference_mode()`` and writes
a cache directory; :class:`EmbeddingCache` reads it back by index. Training then needs neither the
images nor the image model. :func:`write_cache` writes the same format from features computed elsewhere.

Layout of a cache directory::

    manifest.json             count, dim, dtype, views, tower + source fingerprints, shard checksums
    plan.json                 what is being computed (lets an interrupted run resume)
    shards/00000.npy          (n, 1 + views, dim) float16/float32: view 0 = eval (centre crop),
    shards/00000.json         then the augmented views; the json is the shard's commit record
    shards/00000.tokens.npy   with --tokens: (n, h*w, F) float16, the eval view's spatial map (see .tokens)
    keys.utf8, key_offsets.npy             image keys (one UTF-8 blob + int64 offsets)
    paths.utf8, path_offsets.npy           where each image came from
    captions.utf8, caption_offsets.npy     every caption; image_captions.npy maps image -> captions
    source_index.npy          each cached image's position in the source
    skipped.tsv               images that could not be decoded, and cached images without a
                              caption (reason no-caption): where, reason, detail

Work is cut into shards of ``shard_size`` consecutive source records. A shard's features are written
to a temporary name, fsync'ed and renamed, then its json (with the sha256 of the features file) is
written the same way: a shard is complete exactly when its json exists and the checksum matches.
A run that is killed at any moment (even ``kill -9``) resumes from the complete shards and redoes
the rest; batches never cross a shard boundary and augmentation seeds depend only on the image key,
so the resumed cache is byte-identical to an uninterrupted one. Images that fail to decode are not
in the cache: indices run over the good images in source order, and ``skipped.tsv`` lists the others.
Images without a caption are cached (an index or an evaluation can use their features) but never
trained on: :meth:`EmbeddingCache.trainable` names the rows that have a caption, the manifest's
``no_caption`` counts the others and ``skipped.tsv`` lists them.

Speed: decoding runs in worker processes and overlaps the forward; on a CPU the forward runs on
two "lanes" (two single-threaded batches of 16 at once), which keeps 2 cores busier than one
batch on 2 threads. A ``.lock`` file keeps a second writer out of a directory being written.

Under ``torchrun`` (``distributed=True``) rank ``r`` embeds shards ``r, r + W, ...`` and rank 0 writes
the manifest after a barrier; the result equals a one-process run.

The package: :mod:`.format` (names, plan, shard commit records, tables, manifest), :mod:`.workers`
(decoding processes, speed defaults), :mod:`.lock` (one writer per directory), :mod:`.forward` (the
tower as one function), :mod:`.shards` (the shard loop), :mod:`.writer` (:func:`embed_source`),
:mod:`.precomputed` (:func:`write_cache`), :mod:`.reader` (:class:`EmbeddingCache`; :mod:`.pread`, its
positional reads), :mod:`.tokens` (token caches: the tower's spatial map beside its features), :mod:`.stale` (is a cache the
configuration's: tower and source fingerprints, and the rule they were made by), :mod:`.registry` (the
feature index: which cached row holds which image file's features) and :mod:`.reuse` (a run copies those
rows instead of embedding the same files again).

One embedding per image: an image file that an earlier cache embedded with the same tower, pre-processing
and runtime (and is unchanged since: resolved path, size, mtime, inode) is not embedded again by
``embed_source``, ``littune index`` or ``littune eval``: its row is copied from that cache, which leaves
the new cache complete on its own and byte-identical to one made without reuse (see :mod:`.reuse`).
"""

from __future__ import annotations

from .format import DTYPES, FORMAT, LOCK, MANIFEST, PLAN, SHARD_DIR, SKIPPED, VERSION, summary
from .forward import TowerForward, tower_forward
from .lock import lock as _lock
from .reader import EmbeddingCache, default_max_open
from .workers import _cores, augment_rng, default_batch_size, default_lanes, default_threads, default_workers
from .writer import embed_source, write_cache

__all__ = ["DTYPES", "FORMAT", "LOCK", "MANIFEST", "PLAN", "SHARD_DIR", "SKIPPED", "VERSION", "EmbeddingCache",
           "TowerForward", "augment_rng", "default_batch_size", "default_lanes", "default_max_open",
           "default_threads", "default_workers", "embed_source", "summary", "tower_forward", "write_cache"]
