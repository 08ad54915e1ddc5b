"""The emoji benchmark shared by the quickstart and the study: data, caches, evaluation, baselines.

* :func:`prepare` builds (or reuses) the emoji data (``littune data emoji``: training designs and
  concepts, three held-out splits, :data:`SPLITS`) and the embedding cache of one locked image tower
  over the training set and every split.
* :func:`evaluate` measures a model on every held-out split: zero-shot classification with the
  ``emoji`` prompt ensemble (an image's class is its concept folder) and text<->image retrieval in
  which any design of a caption's concept counts -- the numbers the trainer's validation reports.
* Two baselines frame them: chance (:func:`chance`) and the image-only nearest-prototype classifier
  (:func:`prototype_baseline`), the ceiling a locked tower allows for concepts seen in training.
* :func:`fmt` prints a metric for the tables and :func:`code_commit` names the code that made them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

SPLITS = {  # eval split -> what it tests
    "heldout_designs": "designs never seen (Twemoji, OpenMoji), all concepts",
    "heldout_concepts": "concepts never seen, training designs",
    "heldout_both": "unseen concepts in unseen designs",
}
#: The text tower trained from scratch (the ``u`` letter) in the quickstart and the study.
TEXT_TOWER = {"type": "transformer", "width": 256, "depth": 4, "heads": 4, "context_length": 24,
              "vocab_size": 8000, "tokenizer": "bpe", "pooling": "last"}
QUICK_CONCEPTS = 200
TEMPLATES = "emoji"


def say(msg: str) -> None:
    """One progress line on stdout, as the quickstart and the study print them."""
    print(f"[littune] {msg}", flush=True)


# -- data and caches ----------------------------------------------------------------------------
def prepare(out: Path, quick: bool, tower: str | dict = "efficientnet-lite0", progress: bool = True,
            tag: str | None = None, **build_options) -> dict:
    """Build (or reuse) the emoji data and the embedding caches of ``tower``; return their paths.

    ``{"data", "manifest", "train": cache, "eval": {split: {"cache", "classnames"}}}``.
    ``build_options`` go to :func:`littune.builders.emoji.build_emoji` (tests pass a fake
    ``packages`` folder and a small ``size``). A cache whose manifest exists is not embedded again.
    The caches live in ``out/caches/<data>-<tag>``; ``tag`` defaults to the tower's name (a string
    tower, or a spec's ``name`` or ``type``).
    """
    from ..builders.emoji import build_emoji

    data = out / ("data/emoji-quick" if quick else "data/emoji")
    say(f"data: littune data emoji --out {data}" + (f" --limit-concepts {QUICK_CONCEPTS}" if quick else ""))
    manifest = build_emoji(data, limit_concepts=QUICK_CONCEPTS if quick else None, **build_options)
    tag = tag or tower_tag(tower)
    caches = out / "caches" / f"{data.name}-{tag}"
    paths = {"data": data, "manifest": manifest, "train": caches / "train", "eval": {}}
    splits = [s for s in SPLITS if (data / "eval" / f"retrieval_{s}.csv").is_file()]
    embed_missing([(data / "train.csv", caches / "train")]
                  + [(data / "eval" / f"retrieval_{s}.csv", caches / s) for s in splits], tower, tag, progress)
    paths["eval"] = {s: {"cache": caches / s, "classnames": data / "eval" / s / "classnames.txt"} for s in splits}
    return paths


def tower_tag(tower: str | dict) -> str:
    """A tower's name in cache folder names: the string spec, or a spec's ``name`` or ``type``."""
    return tower if isinstance(tower, str) else tower.get("name", tower.get("type", "tower"))


def embed_missing(jobs, tower: str | dict, tag: str, progress: bool, net=None):
    """``littune embed SOURCE --out CACHE`` for each ``(source, cache)`` whose manifest is missing; the
    tower is built once, and only if some cache needs it. Returns it (or ``net``, a tower built by an
    earlier call, which this one uses), or None if no cache needed it."""
    from ..cache import embed_source
    from ..towers.image import build_image_tower

    for source, cache in jobs:
        if not (cache / "manifest.json").is_file():
            net = net or build_image_tower(tower).eval()
            say(f"embed: littune embed {source} --tower {tag} --out {cache}")
            embed_source(source, net, cache, progress=progress)
    return net


# -- the evaluation --------------------------------------------------------------------------------
def evaluate(model, paths: dict, locked: bool, progress: bool = False) -> dict:
    """``{split: zero-shot metrics, f"{split}_retrieval": retrieval metrics}`` on every held-out split.

    Images come from each split's retrieval CSV; with ``locked`` their image features are read from
    the split's cache, otherwise the model runs on the pixels. Every image must embed.
    """
    from ..inference.embeddings import image_embeddings, text_embeddings
    from ..eval.retrieval import retrieval_metrics
    from ..eval.sets import folder_labels, open_retrieval
    from ..eval.templates import load_templates
    from ..eval.zeroshot import zeroshot_classifier, zeroshot_metrics

    results = {}
    for split, info in paths["eval"].items():
        data = open_retrieval(paths["data"] / "eval" / f"retrieval_{split}.csv")
        # skip_bad=False: an image that cannot be embedded is an error, not a smaller split.
        emb, _, _ = image_embeddings(model, data.records, cache=info["cache"] if locked else None,
                                     progress=progress)
        names, labels = folder_labels([r.key for r in data.records], info["classnames"])
        weights = zeroshot_classifier(model, names, load_templates(TEMPLATES)).float().cpu()
        results[split] = zeroshot_metrics(emb @ weights.T, labels)
        txt = text_embeddings(model, data.texts)
        results[f"{split}_retrieval"] = retrieval_metrics(emb, txt, data.text_to_image, image_groups=labels)
    return results


# -- baselines ------------------------------------------------------------------------------------
def chance(classnames_file: str | Path) -> float:
    """Top-1 accuracy of a uniform guess among the split's classes."""
    from ..eval.sets import read_classnames

    return 1 / len(read_classnames(classnames_file))


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _all_features(cache) -> np.ndarray:
    return np.asarray(cache.features(np.arange(len(cache))), dtype=np.float32)


def prototype_baseline(train_cache_dir: Path, eval_cache_dir: Path) -> dict | None:
    """Image-only nearest-prototype accuracy on the eval images whose concept was trained on.

    A concept's prototype is the mean of its training images' (centred, normalised) locked features;
    an eval image is classified to the nearest prototype among the eval split's seen concepts. No text
    is involved: it is what the locked image features alone can tell apart. ``None`` when the split
    holds no trained concept.
    """
    from ..cache import EmbeddingCache

    train, test = EmbeddingCache.open(train_cache_dir), EmbeddingCache.open(eval_cache_dir)
    f_train = _all_features(train)
    mean = f_train.mean(0, keepdims=True)
    f_train = _normalised(_normalised(f_train) - _normalised(mean))
    concept = np.array([Path(train.key(i)).stem for i in range(len(train))])  # images/<design>/<concept>.png
    test_concept = [Path(test.key(i)).parent.name for i in range(len(test))]  # <split>/<concept>/<design>.png
    classes = sorted(set(test_concept) & set(concept.tolist()))
    if not classes:
        return None
    protos = _normalised(np.stack([f_train[concept == c].mean(0) for c in classes]))
    keep = [i for i, c in enumerate(test_concept) if c in set(classes)]
    f_test = _normalised(_normalised(_all_features(test)[keep]) - _normalised(mean))
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[test_concept[i]] for i in keep])
    scores = f_test @ protos.T
    ranks = (scores > scores[np.arange(len(keep)), labels][:, None]).sum(1)
    return {"acc1": float(np.mean(ranks < 1)), "acc5": float(np.mean(ranks < 5)),
            "classes": len(classes), "images": len(keep)}


# -- reporting --------------------------------------------------------------------------------------
def fmt(x) -> str:
    """Three decimals; two significant digits below 0.01, so that chance (e.g. 0.0005) does not round
    away; ``n/a`` for a missing number."""
    if x is None:
        return "n/a"
    return f"{x:.2g}" if 0 < abs(x) < 0.01 else f"{x:.3f}"


def code_commit() -> str:
    """The littune checkout's short commit, ``+dirty`` with uncommitted changes; ``unknown`` outside git."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except Exception:  # noqa: BLE001 - not a git checkout
        return "unknown"
