"""Training configuration: a typed dataclass tree, loaded from YAML, overridable from the command line.

``littune train --config cfg.yaml --set optim.lr=3e-4 --set model.setting=LU``. Unknown keys and
values of the wrong type are errors that name the key (``optim.lr: expected a number, got 'fast'``).
The resolved configuration is written to the run directory as ``config.yaml``, with the batch, steps and
warm-up left null sized from the data (:mod:`littune.train.run_plan`). Its ``model``
section is :class:`LiTConfig`, the model's own configuration (a model directory's ``config.json``
stores the same fields). Every enumerated option is checked against :data:`CHOICES`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_checks import (LOWER_BOUNDS, at_least, check_head_blocks, check_keys, check_sizing, check_val_sets,
                            positive, text_tower_keys)
from .errors import ConfigError
from .train.sampling import check_share
from .model.settings import VALID_SETTINGS, check_lr_mults, parse_setting


#: Every enumerated option and its allowed values, checked in one place (:func:`check_choice`).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.setting": VALID_SETTINGS,
    "model.image_head": ("linear", "identity", "mlp", "attention"),  # identity: the tower's dim == embed_dim
    "model.text_head": ("linear", "identity", "mlp"),
    "model.loss": ("softmax", "sigmoid"),
    "model.image_tower.type": ("efficientnet-lite", "hf", "onnx", "timm", "torch"),
    "model.image_tower.decode": ("exact", "fast"),  # littune.data.preprocess.DECODES
    "model.text_tower.type": ("transformer", "hf"),
    "model.text_tower.tokenizer": ("bpe", "unigram"),
    "optim.name": ("adamw", "adam", "adafactor"),
    "schedule.decay": ("cosine", "linear", "rsqrt", "constant"),
    "precision": ("fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
}
#: Text pooling depends on the text tower: last (EOS) | mean | first token; a pre-trained encoder: mean | cls.
TEXT_POOLING = {"transformer": ("last", "mean", "first"), "hf": ("mean", "cls")}


def check_choice(key: str, value, allowed: tuple | None = None) -> None:
    """One-line :class:`ConfigError` naming ``key`` when ``value`` is not among its allowed values."""
    allowed = CHOICES[key] if allowed is None else allowed
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class LiTConfig:
    """Everything that defines a LiT model (not how it is trained): the ``model`` section of a
    training configuration, and what a model directory's ``config.json`` stores."""

    #: see littune.model.settings; LL: both towers pre-trained and locked, only the heads train (from two
    #: caches), the main job's recipe (docs/studies.md). LU: fine-tune the text tower too
    setting: str = "LL"
    image_tower: str | dict = "efficientnet-lite0"  # short string or dict spec (see littune.towers.image)
    #: multilingual-e5-small (littune[e5]); {type: transformer, ...}: a text tower trained from scratch
    text_tower: dict = field(default_factory=lambda: {
        "type": "hf", "path": "e5-small", "pooling": "mean", "context_length": 64})
    embed_dim: int = 512
    image_head: str = "linear"  # linear | identity | mlp | attention (over the tower's tokens: littune.model.heads)
    image_head_blocks: int = 0  # attention head: transformer blocks over the tokens before pooling (0 or 1)
    text_head: str = "linear"
    temperature_init: float = 10.0
    loss: str = "softmax"  # softmax | sigmoid
    bias_init: float = -10.0
    #: the contrastive loss over this many rows at a time when a rank holds more rows than that:
    #: memory O(global batch x loss_chunk) instead of O(global batch^2), the same loss and gradients
    #: to float rounding (0: always the full logit matrix)
    loss_chunk: int = 1024

    def __post_init__(self):
        self.validate()

    def validate(self) -> "LiTConfig":
        try:
            parse_setting(self.setting)
        except ValueError as e:
            raise ConfigError(f"model.setting: {e}") from None
        for name in ("image_head", "text_head", "loss"):
            check_choice(f"model.{name}", getattr(self, name))
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk: must be >= 0 (0: the full logit matrix), got {self.loss_chunk!r}")
        at_least("model.embed_dim", self.embed_dim, 1)
        check_head_blocks(self.image_head, self.image_head_blocks)
        positive("model.temperature_init", self.temperature_init, " (the initial temperature; its log is learned)")
        self._check_towers()
        return self

    def _check_towers(self) -> None:
        from .towers.image import parse_image_tower

        try:
            image = parse_image_tower(self.image_tower)
        except ValueError as e:
            raise ConfigError(f"model.image_tower: {e}") from None
        check_choice("model.image_tower.type", image.get("type"))
        if "decode" in image:
            check_choice("model.image_tower.decode", image["decode"])
        if not isinstance(self.text_tower, dict):
            raise ConfigError(f"model.text_tower: expected a mapping, got {self.text_tower!r}")
        kind = self.text_tower.get("type", "transformer")
        check_choice("model.text_tower.type", kind)
        check_keys("model.text_tower.", self.text_tower, text_tower_keys(kind))
        if kind == "transformer":
            check_choice("model.text_tower.tokenizer", self.text_tower.get("tokenizer", "bpe"))
        if "pooling" in self.text_tower:
            check_choice("model.text_tower.pooling", self.text_tower["pooling"], TEXT_POOLING[kind])
        prefix = self.text_tower.get("prefix")
        if prefix is not None and not isinstance(prefix, str):  # an hf tower's (a key of no other kind)
            raise ConfigError(f"model.text_tower.prefix: expected a string such as 'query: ', got {prefix!r}")


#: The ``model`` section of :class:`TrainConfig` is the model's own configuration.
ModelSection = LiTConfig


@dataclass
class DataSection:
    #: training pairs: a source (CSV/TSV, JSONL, tar shards, folder, COCO JSON) for the on-the-fly path
    source: str | None = None
    #: embedding cache written by `littune embed` (the locked-tower path); built from `source` if missing
    cache: str | None = None
    #: run a locked tower on every step instead of reading the cache (for comparisons)
    on_the_fly: bool = False
    batch_size: int | None = None  # global batch over all ranks (the contrastive batch); None: sized (run_plan)
    workers: int = 1  # decoding workers for the on-the-fly path
    #: on-the-fly path: Inception crop + flip (true) or the evaluation transform, the cache's pixels (false)
    augment: bool = True
    #: dynamic padding: encode a step's captions in at most this many groups of similar token length,
    #: each padded only to its own longest caption (the groups that pad the fewest tokens), instead of
    #: all to the context length: the same embeddings and loss, less compute (1: one group padded to
    #: the context length, the old way)
    text_buckets: int = 4
    source_options: dict = field(default_factory=dict)
    #: a `littune dedup` list (TSV): its training images, matched by key, are never sampled (the
    #: cache path only); None: train on every captioned image
    exclude: str | None = None
    #: each named language's share of an image's caption draws, e.g. {en: 0.5}; the rest is split
    #: evenly among the image's other languages (see littune.train.sampling); {}: uniform over captions
    language_share: dict = field(default_factory=dict)
    #: the locked tower's own classifier rows as extra training rows captioned with their class names
    #: (the cache path, a tower with a head: efficientnet-lite, a Hugging Face image-classification
    #: folder): {repeat: 2, placement: row|confident|class-mean} (see littune.data.anchors); None: off
    anchors: dict | None = None
    #: at most so many captions of each image take part, by language ({en: 2, "*": 2}: 2 English and 2
    #: of the image's other languages together; see littune.cache.budget); {}: every caption (the cache path)
    caption_budget: dict = field(default_factory=dict)
    #: a locked text tower's caption features (littune.cache.text): computed once into this folder and
    #: read by training, validation and evaluation; None: <run_dir>/text-cache
    text_cache: str | None = None


@dataclass
class OptimSection:
    name: str = "adamw"  # adamw | adam | adafactor
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: learning-rate multipliers: image, text, text_embeddings (an hf text tower's word embeddings),
    #: head (default 1; a locked tower is always 0; a pre-trained hf text tower in LU/UU: text 0.1,
    #: text_embeddings 0, frozen)
    lr_mults: dict = field(default_factory=dict)
    clip_grad_norm: float | None = 1.0
    #: delayed unlocking: {image: {after: 1000, ramp: 200}} keeps a group (image, text, head) at
    #: learning rate 0 and held as if locked for its first `after` steps, then ramps it linearly to
    #: its multiplier over `ramp` steps (see littune.train.optim)
    unlock: dict = field(default_factory=dict)


@dataclass
class ScheduleSection:
    warmup_steps: int | None = None  # None: warmup_fraction x steps
    warmup_fraction: float = 0.1
    decay: str = "cosine"  # cosine | linear | rsqrt | constant
    min_lr_ratio: float = 0.0


@dataclass
class ValSection:
    every: int = 0  # steps between validations (0 = only at the end)
    #: [{"name": "heldout", "cache": DIR, "classnames": FILE (optional), "templates": "short"}]
    zeroshot: list = field(default_factory=list)
    #: [{"name": "captions", "cache": DIR}]
    retrieval: list = field(default_factory=list)


@dataclass
class TrainConfig:
    model: LiTConfig = field(default_factory=LiTConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    val: ValSection = field(default_factory=ValSection)
    steps: int | None = None  # None: from epochs, or sized from the data (littune.train.run_plan)
    epochs: float | None = None
    seed: int = 0
    run_dir: str = "runs/lit"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    grad_accum: int = 1  # micro-batches per step; the contrastive batch stays global
    grad_checkpointing: bool = False
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True
    device: str = "auto"  # auto | cpu | cuda

    def validate(self, need_data: bool = True) -> "TrainConfig":
        """Check every value (``need_data=False``: a configuration without training pairs passes, for
        ``--print-config``)."""
        self.model.validate()
        for key in ("optim.name", "schedule.decay", "precision", "device"):
            check_choice(key, _get(self, key))
        for key, low in LOWER_BOUNDS.items():
            at_least(key, _get(self, key), low)
        check_sizing(self)
        check_val_sets(self.val)
        if need_data and not self.data.source and not self.data.cache:
            raise ConfigError("data.source or data.cache: give the training pairs (a source file or an embedding cache)")
        locked = parse_setting(self.model.setting).image.locked
        if self.data.exclude is not None and (self.data.on_the_fly or not locked):
            raise ConfigError("data.exclude: only training from the embedding cache (a locked image tower, "
                              "data.on_the_fly=false) can exclude images")
        from .data.anchors import check_anchors

        self.data.anchors = check_anchors(self.data.anchors)
        if self.data.anchors is not None and (self.data.on_the_fly or not locked):
            raise ConfigError("data.anchors: only training from the embedding cache (a locked image tower, "
                              "data.on_the_fly=false) can mix in the tower's classes")
        check_lr_mults(self.optim.lr_mults, self.model.text_tower.get("type", "transformer"))
        _check_unlock(self)
        self.data.language_share = check_share(self.data.language_share)
        from .cache.budget import check_budget

        self.data.caption_budget = check_budget(self.data.caption_budget)
        if self.data.caption_budget and (self.data.on_the_fly or not locked):
            raise ConfigError("data.caption_budget: only training from the embedding cache (a locked image tower, "
                              "data.on_the_fly=false) keeps a budget of captions")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def _check_unlock(cfg: TrainConfig) -> None:
    """``optim.unlock``: each named group exists, can train, and unlocks before the last step."""
    setting = parse_setting(cfg.model.setting)
    trainable = {"head"} | {p for p in ("image", "text") if not getattr(setting, p).locked}
    trainable = {p for p in trainable if cfg.optim.lr_mults.get(p, 1.0) != 0}
    for part, spec in cfg.optim.unlock.items():
        key = f"optim.unlock.{part}"
        if part not in ("image", "text", "head"):
            raise ConfigError(f"{key}: unknown group; use image, text, head")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected a mapping like {{after: 1000, ramp: 200}}, got {spec!r}")
        for name, value in spec.items():
            if name not in ("after", "ramp"):
                raise ConfigError(f"{key}.{name}: unknown key; use after, ramp")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key}.{name}: expected an integer >= 0, got {value!r}")
        if part != "head" and getattr(setting, part).locked:
            raise ConfigError(f"{key}: the {part} tower is locked in setting {setting.name} and never trains; "
                              f"use U or u for it to unlock it later")
        if part not in trainable:
            raise ConfigError(f"{key}: optim.lr_mults.{part} is 0, so the group never trains")
        if cfg.steps is not None and spec.get("after", 0) >= cfg.steps:  # else checked once steps is sized
            raise ConfigError(f"{key}.after: {spec['after']} >= steps ({cfg.steps}): the group would never train")
    if trainable and all(cfg.optim.unlock.get(p, {}).get("after", 0) > 0 for p in trainable):
        raise ConfigError("optim.unlock: every trainable group starts held, so step 0 would train nothing; "
                          "give one of them after: 0")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        tp = origin
    return isinstance(value, tp)


def _describe(tp) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
             list: "a list", type(None): "null"}
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return names.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(prefix, data, fields)
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
            continue
        if isinstance(value, str) and not _type_ok(value, tp) and _type_ok(1.0, tp):
            try:  # YAML 1.1 reads 3e-4 as a string
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise ConfigError(f"{prefix}{name}: expected {_describe(tp)}, got {value!r}")
        kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, need_data: bool = True) -> TrainConfig:
    """Defaults <- YAML file <- ``key.sub=value`` overrides (values parsed as YAML); ``need_data``: see
    :meth:`TrainConfig.validate`."""
    tree: dict = asdict(TrainConfig())
    if base:
        _merge(tree, base)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"configuration file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        _check_keys(loaded, TrainConfig)
        _merge(tree, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        _check_keys(_nest(key.strip(), value), TrainConfig)
        _set_dotted(tree, key.strip(), value)
    return _build(TrainConfig, tree).validate(need_data=need_data)


def _nest(dotted: str, value) -> dict:
    out: dict = {}
    _set_dotted(out, dotted, value)
    return out


def _check_keys(data: dict, cls, prefix: str = "") -> None:
    """Unknown keys are caught before merging (so a typo never silently lands in a dict field)."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            _build(cls, {k: v}, prefix)  # raises the unknown-key error with a suggestion
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_keys(v, hints[k], f"{prefix}{k}.")


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k not in ("text_tower", "image_tower",
                                                                              "lr_mults", "source_options"):
            _merge(dst[k], v)
        else:
            dst[k] = v
