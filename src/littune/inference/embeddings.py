"""Embeddings: the one path from images, cached image features or texts into the joint space.

Two words, used the same way everywhere in littune:

* **image features** -- the image tower's raw output, ``(N, F)``: what an embedding cache stores
  for a locked tower (:meth:`~littune.model.LiTModel.image_features`);
* **image embedding** -- features through the image head and L2-normalised, ``(N, D)``: a point of
  the space the text embeddings share (:meth:`~littune.model.LiTModel.embed_image_features`).

The functions here are what evaluation, validation, the study, the search index and the server use:

* :func:`image_embeddings` -- image embeddings of images given as paths, Pillow images or
  :class:`~littune.data.records.Record` objects. The images are decoded (a few threads, one batch
  ahead of the model) and run through the whole model -- a locked tower on the fastest runtime
  (:mod:`littune.towers.runtime`: onnxruntime on a CPU when it exports, opened once per tower) -- or, with
  ``cache=``, looked up by key in an embedding cache whose features only go through the head (the
  image tower is not run).
* :func:`cached_image_embeddings` -- image embeddings of the rows of an opened embedding cache;
  :func:`cached_image_embedding_batches` yields them batch by batch for a writer that keeps memory flat.
* :func:`text_embeddings` -- text embeddings of strings (a text that repeats is encoded once).

Every function works in batches, runs without gradients, leaves the model's train/eval mode as it
found it, shows a progress bar on request and returns L2-normalised CPU float32 tensors.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, Union

import numpy as np
import torch

from ..errors import LittuneError, StaleCacheError
from ..towers.runtime import module_device as model_device  # where the model's weights are
from ..model.heads import cache_rows, head_input, runner_rows, runner_spatial, token_request

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..data.records import Record

ImageLike = Union[str, Path, "Image.Image", "Record"]
Skipped = list[tuple[str, str]]  # (where, reason) of each image left out


# -- small shared pieces -------------------------------------------------------------------------
@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no gradients inside; the previous train/eval mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LittuneError(f"batch size must be at least 1, not {batch_size}")


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc="texts" if unit == "text" else "images", unit=unit, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def describe(item: Any) -> str:
    """How an image is named in messages and skip lists: its path, its record's ``where`` or ``key``, or its type."""
    if isinstance(item, (str, Path)):
        return str(item)
    for name in ("where", "key"):
        value = getattr(item, name, None)
        if value is not None:
            return str(value)
    return f"<{type(item).__name__}>"


def load_rgb(item: ImageLike, reduce_to: int | None = None, render_to: int | None = None):
    """An RGB Pillow image from a path, a Pillow image or a :class:`Record`; ``reduce_to``: a JPEG
    file may be draft-decoded down to this shorter side (:attr:`Preprocess.draft_to`); ``render_to``: an
    SVG is drawn with this shorter side (:attr:`Preprocess.resize_to`).

    Raises :class:`littune.data.decode.BadImage` when the image cannot be decoded.
    """
    from PIL import Image

    from ..data.decode import load_image, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, Path)):
        return load_image(item, reduce_to=reduce_to, render_to=render_to)
    if hasattr(item, "open") and hasattr(item, "key"):
        return item.open(reduce_to=reduce_to, render_to=render_to)
    raise TypeError(f"cannot read an image from {type(item).__name__}; give a path, a PIL image or a Record")


# -- images ----------------------------------------------------------------------------------------
def image_embeddings(model, images: Sequence[ImageLike], cache: str | Path | None = None, batch_size: int = 64,
                     workers: int | None = None, progress: bool = False, skip_bad: bool = False,
                     runtime: str = "auto", reuse: bool = False) -> tuple[torch.Tensor, list[int], Skipped]:
    """Image embeddings of ``images``: ``(embeddings (len(kept), D), kept, skipped)``.

    ``kept`` are the indices of ``images`` that were embedded, ``skipped`` the ``(where, reason)`` of
    the others. Without ``cache`` every image is decoded, preprocessed with the tower's evaluation
    transform and run through the model; ``workers`` decoding threads (default: up to 4) prepare the
    next batch while the model runs. With ``cache`` (an embedding cache directory from
    ``littune embed``, or one :func:`open_feature_cache` opened; images given as records) each image's
    features are read by its key and only the head runs; see :func:`open_feature_cache` for what that needs.
    ``runtime`` runs a locked tower (``auto``, ``torch``, ``onnxruntime``; ``model``: the torch model itself,
    bit for bit what ``model.encode_image`` gives). An image that fails to decode
    or is not in the cache raises :class:`~littune.errors.LittuneError` naming it, or with
    ``skip_bad=True`` is skipped and listed. ``reuse`` (a locked tower, no ``cache``): the tower features (the
    attention head: tokens of its grid) that caches hold for the same image files, computed the same way, are
    read from them (only the head runs; :func:`littune.cache.reuse.find_reused`); a line on stderr says how many."""
    _check_batch_size(batch_size)
    if cache is not None:
        return _embed_by_key(model, list(images), cache, batch_size, progress, skip_bad)
    if reuse and model.setting.image.locked and runtime != "model":
        return _embed_reusing(model, list(images), batch_size, workers, progress, skip_bad, runtime)
    return _embed_decoded(model, list(images), batch_size, workers, progress, skip_bad, runtime)


def _embed_reusing(model, items: list, batch_size: int, workers: int | None, progress: bool, skip_bad: bool,
                   runtime: str) -> tuple[torch.Tensor, list[int], Skipped]:
    """:func:`_embed_decoded` of the images no cache holds; the others' cached features through the head."""
    from ..cache.reuse import find_reused

    _image_encoder(model, runtime)  # opens the runner: what computes the features is part of what is looked up
    name = _RUNNERS[model.image_tower][runtime].name
    found = find_reused(model.image_tower, f"{name}/{model_device(model).type}", items, tokens=token_request(model))
    try:
        emb, kept, skipped = _embed_decoded(model, [items[i] for i in found.rest], batch_size, workers, progress,
                                            skip_bad, runtime)
        kept, parts = [found.rest[k] for k in kept], [emb]
        with evaluating(model):
            for lo in range(0, len(found.indices), found.step):  # pooled features, or tokens (the attention head)
                feats = torch.from_numpy(found.head_rows(lo, lo + found.step)).to(model_device(model))
                parts.append(model.embed_image_features(feats).float().cpu())
    finally:
        found.close()
    found.report.embedded = len(kept)
    if found.report.line():
        print(f"littune: image features: {found.report.line()}", file=sys.stderr)
    both = kept + found.indices
    order = np.argsort(np.asarray(both, dtype=np.int64), kind="stable")
    return torch.cat(parts)[torch.from_numpy(order)], [both[k] for k in order.tolist()], skipped


def _decoded_batches(items: list, preprocess, batch_size: int, workers: int | None):
    """Yield ``(indices, [(pixels or None, reason)])`` per batch, decoding the next batch meanwhile."""
    workers = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))

    def prepare(i: int):
        from ..data.decode import BadImage

        try:
            return preprocess.eval(load_rgb(items[i], preprocess.draft_to, preprocess.resize_to)), None
        except BadImage as e:
            return None, e.reason + (f": {e.detail}" if e.detail else "")

    batches = _batches(len(items), batch_size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(prepare, i) for i in batches[0]] if batches else []
        try:
            for b, idx in enumerate(batches):
                ready = [f.result() for f in pending]
                pending = [pool.submit(prepare, i) for i in batches[b + 1]] if b + 1 < len(batches) else []
                yield idx, ready
        finally:
            for f in pending:
                f.cancel()


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _image_encoder(model, runtime: str):
    """``pixels -> image embeddings``: a locked tower through its :mod:`littune.towers.runtime` runner (kept
    with the tower, so a server opens it once), then the head; a trained tower through the model."""
    device = model_device(model)
    if not model.setting.image.locked or runtime == "model":
        return lambda px: model.encode_image(px.to(device))
    runners = _RUNNERS.setdefault(model.image_tower, {})
    runner = runners.get(runtime)
    if runner is None:
        from ..towers.runtime import open_runner

        runner = runners[runtime] = open_runner(model.image_tower, runtime, device=device, quiet=runtime == "auto",
                                                spatial=runner_spatial(model))  # the attention head: its map too
    return lambda px: model.embed_image_features(torch.from_numpy(runner_rows(model, runner(px))).to(device))


def _embed_decoded(model, items: list, batch_size: int, workers: int | None, progress: bool,
                   skip_bad: bool, runtime: str = "auto") -> tuple[torch.Tensor, list[int], Skipped]:
    encode = _image_encoder(model, runtime)
    out: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: Skipped = []
    bar = _progress(len(items), "img") if progress else None
    batches = contextlib.closing(_decoded_batches(items, model.preprocess, batch_size, workers))
    with evaluating(model), batches as decoded:
        for idx, ready in decoded:
            tensors = []
            for i, (pixels, why) in zip(idx, ready):
                if pixels is None:
                    if not skip_bad:
                        raise LittuneError(f"cannot read image {describe(items[i])}: {why}")
                    skipped.append((describe(items[i]), why))
                    continue
                tensors.append(pixels)
                kept.append(i)
            if tensors:
                out.append(encode(torch.stack(tensors)).float().cpu())
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return (torch.cat(out) if out else torch.empty(0, model.config.embed_dim)), kept, skipped


def open_feature_cache(model, cache: str | Path, source_fingerprint: str | None = None,
                       allow_stale: bool | None = None):
    """The embedding cache ``cache``, opened and checked for ``model``: the image tower must be locked
    (a trained tower's features would not be the cached ones) and the cache's tower fingerprint
    must be the model's, its source fingerprint ``source_fingerprint`` when given (the images looked up
    by key are the cached ones): :class:`~littune.errors.StaleCacheError` otherwise (``allow_stale``: see
    :meth:`~littune.cache.EmbeddingCache.check`)."""
    if not model.setting.image.locked:
        raise LittuneError(f"the model's image tower is trained (setting {model.config.setting}): features in "
                           f"the cache {cache} were computed before training; evaluate without --cache")
    from ..cache import EmbeddingCache

    store = EmbeddingCache.open(cache)
    store.check(tower_fingerprint=model.image_fingerprint, source_fingerprint=source_fingerprint,
                allow_stale=allow_stale)
    return store


def _embed_by_key(model, records: list, cache, batch_size: int, progress: bool,
                  skip_bad: bool) -> tuple[torch.Tensor, list[int], Skipped]:
    """``cache``: a directory, or an :class:`~littune.cache.EmbeddingCache` opened and checked already."""
    store = cache if hasattr(cache, "features") else open_feature_cache(model, cache)
    cache = store.directory
    where = {store.key(i): i for i in range(len(store))}
    kept, rows, skipped = [], [], []
    for i, rec in enumerate(records):
        if getattr(rec, "key", None) is None:
            raise LittuneError(f"{describe(rec)}: an image looked up in an embedding cache must be a record with a key")
        j = where.get(rec.key)
        if j is not None:
            kept.append(i)
            rows.append(j)
        elif skip_bad:
            skipped.append((describe(rec), f"not in the cache {cache}"))
        else:
            raise LittuneError(f"image {describe(rec)} is not in the cache {cache}")
    if records and not kept:
        raise StaleCacheError(f"the cache {cache} holds none of the {len(records)} images of this dataset "
                              f"(e.g. {records[0].key!r}); was it built from another source?")
    emb = cached_image_embeddings(model, store, rows, batch_size=max(batch_size, 1024), progress=progress)
    return emb, kept, skipped


def cached_image_embedding_batches(model, cache, rows: Sequence[int] | None = None, batch_size: int = 4096
                                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, embeddings)``: the image embeddings of ``rows[start:start + len(embeddings)]``
    (default: every row) of the opened embedding cache ``cache``, one batch at a time.

    The caller has checked that the cache belongs to the model (:func:`open_feature_cache`);
    the features go through the model's image head only (the attention head: the tokens, 256 rows at a time).
    """
    _check_batch_size(batch_size)
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows, dtype=np.int64)
    device, tokens = model_device(model), head_input(model)
    step = min(batch_size, 256) if tokens else batch_size
    with evaluating(model):
        for s in range(0, len(rows), step):
            feats = np.ascontiguousarray(cache_rows(cache, rows[s:s + step], tokens), dtype=np.float32)
            yield s, model.embed_image_features(torch.from_numpy(feats).to(device)).float().cpu()


def cached_image_embeddings(model, cache, rows: Sequence[int] | None = None, batch_size: int = 4096,
                            progress: bool = False) -> torch.Tensor:
    """``(len(rows), D)`` image embeddings of ``rows`` (default: every row) of the opened embedding
    cache ``cache`` (see :func:`cached_image_embedding_batches`)."""
    total = len(cache) if rows is None else len(rows)
    out = []
    bar = _progress(total, "img") if progress else None
    for _, emb in cached_image_embedding_batches(model, cache, rows, batch_size):
        out.append(emb)
        if bar is not None:
            bar.update(len(emb))
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty(0, model.config.embed_dim)


# -- texts -----------------------------------------------------------------------------------------
def text_embeddings(model, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                    memo: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(len(texts), D)`` L2-normalised text embeddings (a text that repeats is encoded once).
    ``memo``: text -> embedding of texts already encoded by this model (read, and filled with the new
    ones), so that several calls in one evaluation encode a text shared between them once."""
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise LittuneError(f"texts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    _check_batch_size(batch_size)
    # Each distinct text is encoded once (shared captions, repeated labels), in batches of texts with
    # about as many tokens (:func:`_token_batches`), so that a batch pads little; the rows come back
    # in the caller's order.
    unique = sorted(set(texts).difference(memo or ()), key=lambda t: (len(t), t))
    if getattr(model, "text_store", None) is not None:  # a locked text tower's cache
        emb = _stored_text_embeddings(model, unique, batch_size, progress)
        return _in_order(texts, unique, emb, memo)
    device = model_device(model)
    out, rows = [], []
    bar = _progress(len(unique), "text") if progress else None
    with evaluating(model):
        for idx, toks in _token_batches(model, unique, batch_size):
            out.append(model.encode_text(**{k: v.to(device) for k, v in toks.items()}).float().cpu())
            rows.append(idx)
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    emb = torch.empty(len(unique), out[0].shape[1] if out else model.config.embed_dim)
    if out:
        emb[torch.cat(rows)] = torch.cat(out)
    return _in_order(texts, unique, emb, memo)


def _in_order(texts: list[str], unique: list[str], emb: torch.Tensor, memo: dict | None) -> torch.Tensor:
    """The rows of ``emb`` (one per text of ``unique``) in the order of ``texts`` (see :func:`text_embeddings`)."""
    if memo is None:
        where = {t: i for i, t in enumerate(unique)}
        return emb[torch.tensor([where[t] for t in texts], dtype=torch.long)]
    memo.update(zip(unique, emb))
    return torch.stack([memo[t] for t in texts]) if texts else emb[:0]


def text_tower_features(model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """``(len(texts), dim)`` float32: the text tower's raw output (before the head) for each text."""
    device = model_device(model)
    out = np.empty((len(texts), model.text_tower.dim), dtype=np.float32)
    with evaluating(model), torch.inference_mode():
        for idx, toks in _token_batches(model, list(texts), batch_size):
            feats = model.text_features(**{k: v.to(device) for k, v in toks.items()})
            out[idx.numpy()] = feats.float().cpu().numpy()
    return out


def _stored_text_embeddings(model, unique: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    """Embeddings of ``unique`` from the model's text cache, computing (and storing) the texts it lacks."""
    store = model.text_store
    store.fill(unique, lambda chunk: text_tower_features(model, chunk, batch_size), progress=progress)
    device, parts = model_device(model), []
    with torch.no_grad():
        for lo in range(0, len(unique), 65536):
            feats = torch.from_numpy(store.features(unique[lo:lo + 65536])).to(device)
            parts.append(model.embed_text_features(feats).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, model.config.embed_dim)


#: texts tokenized at once by :func:`_token_batches` (then sorted by their token counts)
TOKENIZE_CHUNK = 8192


def _token_batches(model, texts: list[str], batch_size: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """``(rows, tokens)`` batches of ``texts``: ``TOKENIZE_CHUNK`` texts are tokenized at once, sorted
    by their token counts (characters say little across scripts: a Thai or Bengali name takes two or
    three tokens a character, a Latin one a token a word), and cut into batches of ``batch_size``,
    each cut to its own longest text (what tokenizing the batch alone with ``padding="longest"``
    gives: a text's tokens do not depend on the others)."""
    side = model.text_tower.padding_side
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        toks = model.tokenize(texts[start:start + TOKENIZE_CHUNK], padding="longest")
        lengths = toks["attention_mask"].sum(1)
        order = torch.argsort(lengths, stable=True)
        for b in range(0, len(order), batch_size):
            rows = order[b:b + batch_size]
            width = max(int(lengths[rows].max()), 1)
            cols = slice(None, width) if side == "right" else slice(-width, None)
            yield rows + start, {k: v[rows][:, cols] for k, v in toks.items()}
