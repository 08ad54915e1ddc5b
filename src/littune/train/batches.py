"""Training batches, one per step, from the embedding cache or decoded on the fly.

Both paths are *stateless*: the content of step ``s`` depends only on (seed, s), never on what came
before. Each epoch is a seeded permutation of the images; each step takes the next global batch
from it, and rank ``r`` of ``W`` takes its contiguous slice. One caption is sampled per image per
step (and, from a cache with ``--views K``, one augmented view). Resuming at step ``s`` therefore
reproduces exactly the batches an uninterrupted run would have seen.

Dynamic padding (:func:`length_groups`): a step's captions are tokenized once and encoded in a few
groups of similar length, each cut to its own longest caption, so the text tower computes on little
padding while the contrastive batch stays the whole step.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..errors import LittuneError
from .sampling import pick_caption


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


#: a cache whose eval-view features take at most this many bytes (float32) is read into memory once
RESIDENT_BYTES = 512 << 20


class StepPlan:
    """Which images (and caption/view choices) each rank uses at each step."""

    def __init__(self, n_images: int, global_batch: int, rank: int, world: int, seed: int):
        if global_batch % world:
            raise LittuneError(f"data.batch_size {global_batch} must be divisible by the number of ranks {world}")
        if n_images < global_batch:
            raise LittuneError(f"only {n_images} training images, fewer than one batch of {global_batch}: "
                               "lower data.batch_size")
        self.n, self.batch, self.rank, self.world, self.seed = n_images, global_batch, rank, world, seed
        self.steps_per_epoch = n_images // global_batch  # the remainder of each permutation is dropped
        self._order: tuple[int, np.ndarray] | None = None

    def local(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows at ``step`` (positions into the image list) and one random 62-bit number per row.

        The random numbers (caption choice, view choice, augmentation seed) are drawn for the whole
        global batch and then sliced, so they do not depend on the number of ranks.
        """
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _epoch_order(self.n, self.seed, epoch))
        rows = self._order[1][pos * self.batch:(pos + 1) * self.batch]
        rand = np.random.default_rng([self.seed, step, 7919]).integers(1 << 62, size=self.batch, dtype=np.int64)
        per = self.batch // self.world
        part = slice(self.rank * per, (self.rank + 1) * per)
        return rows[part], rand[part]


class CacheBatches:
    """Batches of cached image features + one sampled caption each.

    Nothing here grows with the cache: rows and captions are read from it step by step (the only
    per-image array is the epoch's permutation). ``exclude`` names a ``littune dedup`` list (or None):
    the images it lists, matched by key, are never sampled; ``excluded`` counts the captioned rows it
    removed. With nothing excluded the batches are exactly those without the option. ``extra`` (or
    None): rows to mix in beside the cache's (:class:`~littune.cache.mix.MixedRows`, each listed
    ``extra.repeat`` times per epoch), e.g. the tower's own classes (``data.anchors``); None: the
    batches are exactly those without it. ``language_share``: the caption sampling rule of
    :mod:`littune.train.sampling` (``{}``: uniform). ``tokens`` (the attention image head): each batch's
    ``image_features`` are the cache's tokens ``(n, T, F)`` (:meth:`EmbeddingCache.tokens`, the eval view),
    not its pooled features; a cache without tokens, or ``extra`` rows (pooled only), is refused.
    """

    def __init__(self, cache, global_batch: int | None, rank: int, world: int, seed: int, exclude=None, extra=None,
                 language_share: dict | None = None, budget: dict | None = None, tokens: bool = False):
        self.tokens = tokens
        if tokens:
            from ..model.heads import check_token_cache

            check_token_cache(cache)
            if extra is not None:
                raise LittuneError("data.anchors: the tower's classes are pooled features, not tokens: "
                                   "model.image_head=attention cannot mix them in")
        if budget:  # data.caption_budget: each image keeps only its budgeted captions (littune.cache.budget)
            from ..cache.budget import CaptionBudget

            cache = CaptionBudget(cache, budget, seed)
        self.cache, self.language_share = cache, language_share or {}
        rows = cache.trainable()  # images with a caption; None below: all of them (no index array kept)
        self.excluded = 0
        if exclude is not None:
            from ..data.dedup import excluded_rows

            kept = np.setdiff1d(rows, excluded_rows(cache, exclude))  # sorted, as trainable() is
            self.excluded, rows = len(rows) - len(kept), kept
        if not len(rows):
            raise LittuneError(f"none of the {len(cache)} images of the cache {cache.directory} has a caption"
                               f"{' and is not excluded' if self.excluded else ''}: nothing to train on "
                               "(see its skipped.tsv)")
        self.rows = None if len(rows) == len(cache) else rows
        self._parts = [(cache, rows), (extra, None)] if extra is not None else [(cache, rows)]
        if extra is not None:  # data.anchors: more rows beside the cache's, listed extra.repeat times
            from ..cache.mix import MixedRows

            self.cache = MixedRows([(cache, self.rows, 1), (extra, None, extra.repeat)])
            self.rows, rows = None, self.cache.trainable()
        self.pairs, self._where = len(rows), (rank, world, seed)  # the rows an epoch visits (littune.train.run_plan)
        self.plan = None if global_batch is None else StepPlan(len(rows), global_batch, rank, world, seed)
        self._resident = self._read_all()

    def set_batch(self, global_batch: int) -> None:
        """The global batch, where it was None (not known) when the batches were made."""
        self.plan = StepPlan(self.pairs, global_batch, *self._where)

    def _read_all(self) -> np.ndarray | None:
        """A small cache's features (eval view), read into memory once: a step then gathers its rows
        instead of one positional read each (the same values). A large cache, or one with augmented
        views, is read step by step, so memory stays flat whatever its size."""
        n, dim = len(self.cache), int(self.cache.dim)
        if self.tokens:
            grid = self.cache.token_grid
            dim = int(self.cache.token_dim) * int(np.prod(grid))
        if (getattr(self.cache, "views", 0) and not self.tokens) or n * dim * 4 > RESIDENT_BYTES:
            return None
        return self._rows(np.arange(n, dtype=np.int64))

    def _rows(self, rows: np.ndarray, view=None) -> np.ndarray:
        return self.cache.tokens(rows) if self.tokens else self.cache.features(rows, view=view)

    def texts(self):
        """Every caption a batch can draw (what a locked text tower's cache must hold), repeats included."""
        for source, rows in self._parts:
            rows = np.arange(len(source)) if rows is None else rows
            if hasattr(source, "texts"):  # a caption budget
                yield from source.texts(rows)
            else:
                for i in rows.tolist():
                    yield from source.captions(i)

    def __call__(self, step: int) -> dict:
        rows, rand = self.plan.local(step)
        rows = rows if self.rows is None else self.rows[rows]
        captions = self.cache.sample_captions(rows, rand, self.language_share)
        view = None
        if getattr(self.cache, "views", 0) and not self.tokens:  # tokens: the eval view's only
            view = (rand >> 20) % self.cache.views
        feats = self._resident[rows] if self._resident is not None else self._rows(rows, view)
        return {"image_features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
                "captions": captions}


class WithTextFeatures:
    """Batches of ``make`` with their captions' features from a text cache (``text_features``): a
    locked text tower's output, read instead of computed (:mod:`littune.cache.text`)."""

    def __init__(self, make, store):
        self.make, self.store = make, store

    def __call__(self, step: int) -> dict:
        batch = self.make(step)
        batch["text_features"] = torch.from_numpy(self.store.features(batch["captions"]))
        return batch


def fill_text_cache(model, folder, texts, progress: bool) -> None:
    """Open the model's text cache in ``folder`` and compute the ``texts`` it lacks (the captions a
    training batch can draw), saying how many and how long."""
    import time

    from ..inference.embeddings import text_tower_features
    from .monitor import log_line

    store = model.use_text_cache(folder)  # texts streamed: nothing held per caption (littune.cache.text)
    t0 = time.perf_counter()
    todo = store.fill(texts, lambda chunk: text_tower_features(model, chunk), progress=progress)
    log_line(f"text cache {folder}: {todo:,} captions computed now, {len(store):,} held "
             f"({time.perf_counter() - t0:.0f} s)")


class Prefetched:
    """``make(s)`` for each step ``s`` of ``steps``, in order, with step s + 1 made in a thread while the
    caller trains on step s. A batch is a pure function of its step (module doc), so the batches are
    exactly those of the plain loop; the thread's Python work (caption sampling, feature reads) runs
    while torch computes without the GIL. An error making a batch is raised by the ``next`` that wants it."""

    def __init__(self, make, steps):
        from concurrent.futures import ThreadPoolExecutor

        self._make, self._steps = make, iter(steps)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="littune-batches")
        self._next = self._submit()

    def _submit(self):
        step = next(self._steps, None)
        return None if step is None else self._pool.submit(self._make, step)

    def __iter__(self):
        return self

    def __next__(self):
        if self._next is None:
            self.close()
            raise StopIteration
        batch = self._next.result()
        self._next = self._submit()
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OnTheFlyBatches(torch.utils.data.Dataset):
    """Decoded, augmented image batches for unlocked towers (or a forced on-the-fly locked tower).

    Indexed by step, so a DataLoader with worker processes prefetches whole batches. A file that
    fails to decode is replaced by the next good image (deterministically) and counted.
    """

    def __init__(self, records, preprocess, global_batch: int, rank: int, world: int, seed: int,
                 augment: bool = True, language_share: dict | None = None):
        self.records = [r for r in records if r.captions]  # an image without a caption is never trained on
        if not self.records:
            raise LittuneError(f"none of the {len(records)} images has a caption: nothing to train on")
        self.preprocess, self.augment, self.seed = preprocess, augment, seed
        self.language_share = language_share or {}
        self.plan = StepPlan(len(self.records), global_batch, rank, world, seed)

    def __len__(self) -> int:  # effectively unbounded; the trainer decides when to stop
        return 1 << 40

    def _image(self, i: int, rng: random.Random):
        from ..data.decode import BadImage

        for k in range(len(self.records)):
            rec = self.records[(i + k) % len(self.records)]
            try:
                img = rec.open(reduce_to=None if self.augment else self.preprocess.draft_to,
                               render_to=self.preprocess.resize_to)
            except BadImage as e:
                self.skipped.append(f"{rec.key}\t{e}")
                continue
            return rec, (self.preprocess.train(img, rng) if self.augment else self.preprocess.eval(img))
        raise LittuneError("no training image could be decoded")

    def __getitem__(self, step: int) -> dict:
        rows, rand = self.plan.local(step)
        self.skipped: list[str] = []
        pixels, captions = [], []
        for row, r in zip(rows, rand):
            rec, px = self._image(int(row), random.Random(int(r)))
            pixels.append(px)
            k = pick_caption(rec.langs, int(r), self.language_share) if rec.langs else int(r % len(rec.captions))
            captions.append(rec.captions[k])
        return {"pixels": torch.stack(pixels), "captions": captions, "skipped": list(self.skipped)}


def step_loader(dataset: OnTheFlyBatches, start: int, stop: int, workers: int):
    """Batches for steps ``start..stop-1`` in order, decoded by ``workers`` processes."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop),
                                       num_workers=workers, persistent_workers=False,
                                       prefetch_factor=2 if workers > 0 else None, worker_init_fn=_worker_init)


def _worker_init(_worker_id: int) -> None:
    """A forked worker closes its copy of the run directory's lock: it must not outlive a killed run's."""
    from ..cache.lock import close_inherited_locks

    close_inherited_locks()


def length_groups(tokens: dict[str, torch.Tensor], k: int, padding_side: str = "right") -> list[tuple]:
    """Split one tokenization (padded to its longest) into at most ``k`` groups, each cut to its own
    longest text: ``[(rows, {"input_ids", "attention_mask"}), ...]``, rows in ascending length.

    The groups are the ones that pad the fewest tokens in all (a small dynamic programme over the
    distinct lengths, each group a run of them in sorted order). Cutting the padded end (``padding_side``
    of the tokenizer) gives exactly what tokenizing each group on its own with ``padding="longest"``
    would, since each text's tokens do not depend on the others.
    """
    lengths = tokens["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    values, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    ends = np.cumsum(counts.tolist())
    cuts = _fewest_padded_cuts(values.tolist(), ends.tolist(), k)
    out, start = [], 0
    for j in cuts:
        rows, width = order[start:ends[j]], max(int(values[j]), 1)
        cols = slice(None, width) if padding_side == "right" else slice(-width, None)
        out.append((rows, {name: t[rows][:, cols] for name, t in tokens.items()}))
        start = ends[j]
    return out


def _fewest_padded_cuts(values: list[int], ends: list[int], k: int) -> list[int]:
    """Indices j of the distinct lengths that end a group, for at most k groups padding the fewest
    tokens (a group over distinct lengths i+1..j costs its count times ``values[j]``)."""
    m, inf = len(values), float("inf")
    best = [[inf] * m for _ in range(k)]  # best[g][j]: distinct lengths 0..j in g+1 groups
    back = [[-1] * m for _ in range(k)]
    for j in range(m):
        best[0][j] = ends[j] * values[j]
    for g in range(1, k):
        for j in range(g, m):
            for i in range(g - 1, j):  # the previous group ends at distinct length i
                cost = best[g - 1][i] + (ends[j] - ends[i]) * values[j]
                if cost < best[g][j]:
                    best[g][j], back[g][j] = cost, i
    g = min(range(k), key=lambda g: (best[g][m - 1], g))  # the fewest groups among the cheapest
    cuts, j = [], m - 1
    while j >= 0:
        cuts.append(j)
        j, g = back[g][j], g - 1
    return cuts[::-1]
