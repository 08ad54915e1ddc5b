"""Checks of training-configuration values beyond their types, each a one-line :class:`ConfigError` naming the key.

Lower bounds of counts and rates (:data:`LOWER_BOUNDS`), the keys of the free-form mappings a typed
dataclass cannot check (a text tower spec, the validation sets), and the suggestion for a misspelt
key (:func:`unknown_key`, which :mod:`littune.config` uses for its own sections too).
"""

from __future__ import annotations

import difflib
import math

from .errors import ConfigError

#: the smallest value of each count or rate (0: weight_decay none, keep_checkpoints every checkpoint,
#: checkpoint_every only the last, val.every only at the end, data.workers decode in the trainer)
LOWER_BOUNDS = {"grad_accum": 1, "data.text_buckets": 1, "optim.weight_decay": 0, "keep_checkpoints": 0,
                "checkpoint_every": 0, "val.every": 0, "data.workers": 0, "log_every": 1}
#: the smallest value of each key that sizes a run (littune.train.run_plan), where it is set (not None)
SIZING_BOUNDS = {"steps": 1, "data.batch_size": 1, "schedule.warmup_steps": 0}
#: the keys of a pre-trained (``hf``) text tower spec; a ``transformer`` one takes its config's fields
HF_TEXT_KEYS = ("type", "path", "pooling", "context_length", "prefix")
#: the keys of a ``val.zeroshot`` / ``val.retrieval`` entry
VAL_KEYS = {"zeroshot": ("name", "cache", "classnames", "templates"), "retrieval": ("name", "cache", "group_by_folder")}


def unknown_key(prefix: str, name: str, known) -> ConfigError:
    """``unknown configuration key 'PREFIX+NAME' (did you mean PREFIX+CLOSE?)``, or the known keys if none is close."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown configuration key {f'{prefix}{name}'!r}{hint}")


def check_keys(prefix: str, mapping: dict, known) -> None:
    for name in mapping:
        if name not in known:
            raise unknown_key(prefix, name, known)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def at_least(key: str, value, low) -> None:
    if not _number(value) or value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")


def positive(key: str, value, what: str = "") -> None:
    if not _number(value) or not 0 < value < math.inf:
        raise ConfigError(f"{key}: must be > 0{what}, got {value!r}")


def text_tower_keys(kind: str) -> tuple[str, ...]:
    """The keys a text tower spec of type ``kind`` (``hf`` or ``transformer``) may hold."""
    if kind == "hf":
        return HF_TEXT_KEYS
    from .towers.text import TextTransformerConfig

    return ("type", "tokenizer", "path", *TextTransformerConfig.__dataclass_fields__)


def check_val_sets(val) -> None:
    """Every ``val.zeroshot`` / ``val.retrieval`` entry: a mapping of known keys that names its cache."""
    for kind, known in VAL_KEYS.items():
        for i, item in enumerate(getattr(val, kind)):
            key = f"val.{kind}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{key}: expected a mapping like {{name: heldout, cache: DIR}}, got {item!r}")
            check_keys(f"{key}.", item, known)
            if not item.get("cache"):
                raise ConfigError(f"{key}.cache: required (the set's embedding cache, from `littune embed`)")


def check_head_blocks(head: str, blocks) -> None:
    """``model.image_head_blocks``: 0 or 1 transformer blocks, and only under the attention head."""
    if blocks not in (0, 1) or isinstance(blocks, bool):
        raise ConfigError(f"model.image_head_blocks: 0 or 1 (transformer blocks before the attention pooling), "
                          f"got {blocks!r}")
    if blocks and head != "attention":
        raise ConfigError(f"model.image_head_blocks: {blocks} blocks need model.image_head=attention, not {head!r}")


def check_sizing(cfg) -> None:
    """The keys that size a run (``steps``, ``epochs``, ``data.batch_size``, ``schedule.warmup_*``): each
    None (sized from the data by littune.train.run_plan) or in range; a batch that grad_accum divides."""
    for key, low in SIZING_BOUNDS.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value is not None:
            at_least(key, value, low)
    if cfg.epochs is not None:
        positive("epochs", cfg.epochs, " (training passes over the pairs; null: sized from the data)")
    fraction = cfg.schedule.warmup_fraction
    if not _number(fraction) or not 0 <= fraction < 1:
        raise ConfigError(f"schedule.warmup_fraction: must be >= 0 and < 1 (of the steps), got {fraction!r}")
    if cfg.data.batch_size is not None and cfg.data.batch_size % cfg.grad_accum:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by grad_accum ({cfg.grad_accum})")
