"""Optimisers and learning-rate schedules.

The model hands out parameter groups with learning-rate multipliers (a locked tower's is 0 and it
never reaches the optimiser; ``optim.lr_mults`` sets ``image``, ``text``, ``text_embeddings`` -- an
``hf`` text tower's word embeddings -- and ``head``; a pre-trained ``hf`` text tower that trains
defaults to ``text`` 0.1 and ``text_embeddings`` 0, frozen); each group's learning rate is
``lr * lr_mult * schedule(step) * unlock(step)``. The schedule is a linear warm-up followed by
cosine, linear or reciprocal-square-root decay (or constant), down to ``min_lr_ratio`` of the peak.

``unlock`` is the paper's "train the image tower later or slower": ``optim.unlock: {image: {after:
N, ramp: R}}`` keeps a group at 0 for its first N steps, then ramps it linearly to 1 over R steps
(1 at once when R is 0); a group not named is 1 throughout. While a group's factor is 0 it is
*held* (:func:`held_groups`, :meth:`littune.model.LiTModel.hold`): it behaves as locked -- no
gradient is computed, so the optimiser skips its parameters entirely (no update, no weight decay,
no Adam moments: its moments start fresh when it unlocks, as a newly unlocked tower's would), and a
held tower stays in eval mode (no BatchNorm statistic moves, no dropout). Every factor depends only
on the step, so a resumed run is the uninterrupted one. The metrics log shows every part's rate
(:func:`group_lrs`), so a held tower reads 0 there rather than hiding behind one number.
"""

from __future__ import annotations

import math

import torch

from ..config import check_choice
from ..errors import ConfigError


def build_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
    """The optimiser over the model's groups whose multiplier is not 0 (``optim.lr_mults``, see
    :meth:`littune.model.LiTModel.lr_multipliers`); the others are frozen in the model
    (:meth:`~littune.model.LiTModel.set_lr_mults`: no gradient, no optimiser state)."""
    model.set_lr_mults(optim_cfg.lr_mults)
    groups = []
    for g in model.param_groups(optim_cfg.lr_mults, optim_cfg.weight_decay):
        if g["frozen"]:
            continue
        groups.append({"params": g["params"], "lr": optim_cfg.lr * g["lr_mult"], "weight_decay": g["weight_decay"],
                       "name": g["name"]})
    if not groups:
        raise ConfigError("nothing to train: every parameter group is locked")
    name = optim_cfg.name
    check_choice("optim.name", name)
    if name in ("adamw", "adam"):
        # adam: decoupled weight decay off; weight decay as L2 in the gradient, as torch.optim.Adam does.
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, **_fused(groups))
    if not hasattr(torch.optim, "Adafactor"):  # adafactor
        raise ConfigError("optim.name=adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
    return torch.optim.Adafactor(groups, lr=optim_cfg.lr)


def _fused(groups: list[dict]) -> dict:
    """``{"fused": True}`` when every parameter is a floating-point tensor on a CPU or CUDA device:
    torch's fused Adam updates all of them in one kernel per group instead of a dozen operators per
    tensor (the main job's 4-block text tower on 2 cores: ~40 ms to ~7 ms a step). The same update rule; the
    arithmetic is ordered differently, so weights agree with the unfused one to rounding."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok and params else {}


def schedule_factor(step: int, total: int, warmup: int, decay: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    check_choice("schedule.decay", decay)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    if decay == "rsqrt":
        return max(min_ratio, 1.0 / math.sqrt((step - warmup + 1)))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        frac = 1.0 - progress
    else:  # cosine
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * frac


def unlock_factor(step: int, after: int = 0, ramp: int = 0) -> float:
    """A delayed group's multiplier at ``step`` (0-based): 0 for the first ``after`` steps, then
    ``1/ramp, 2/ramp, ... 1`` over ``ramp`` steps (1 at once when ``ramp`` is 0)."""
    if step < after:
        return 0.0
    if ramp > 0:
        return min(1.0, (step - after + 1) / ramp)
    return 1.0


def held_groups(unlock: dict | None, step: int) -> frozenset[str]:
    """The groups (``image``, ``text``, ``head``) whose unlock factor is 0 at ``step``."""
    return frozenset(part for part, spec in (unlock or {}).items() if unlock_factor(step, **spec) == 0.0)


def group_part(name: str) -> str:
    """The part (``image``, ``text``, ``text_embeddings``, ``head``) an optimiser group named by the
    model belongs to."""
    return name.removesuffix("_no_decay")


def unlock_part(name: str) -> str:
    """The part whose ``optim.unlock`` entry holds and ramps a group: a text tower's word embeddings
    unlock with the text tower."""
    part = group_part(name)
    return "text" if part == "text_embeddings" else part


def lr_mults_line(model, lr_mults: dict | None) -> str:
    """One line for the start of training: each group's learning-rate multiplier and where it comes from."""
    from ..model.settings import default_lr_mults

    given, defaults = lr_mults or {}, default_lr_mults(model.setting, model.text_tower.kind)
    items = []
    for part, mult in model.lr_multipliers(lr_mults).items():
        tower = getattr(model.setting, "text" if part == "text_embeddings" else part, None)
        why = ("locked" if tower is not None and tower.locked else "set" if part in given
               else f"{model.setting.name}'s default for a pre-trained text tower" if part in defaults else "")
        why = f"frozen: {why}" if mult == 0 and why not in ("locked", "") else why
        items.append(f"{part} {mult:g}" + (f" ({why})" if why else ""))
    return "learning-rate multipliers (optim.lr_mults): " + ", ".join(items)


def _schedule(schedule_cfg, total_steps: int):
    """``step -> schedule_factor(step)`` for the ``schedule`` section."""
    def factor(step: int) -> float:
        return schedule_factor(step, total_steps, schedule_cfg.warmup_steps, schedule_cfg.decay,
                               schedule_cfg.min_lr_ratio)

    return factor


def build_scheduler(optimizer, schedule_cfg, total_steps: int, unlock: dict | None = None):
    """Each group's learning rate is its base times :func:`schedule_factor`, times
    :func:`unlock_factor` for a group named in ``unlock`` (``optim.unlock``, validated by the config)."""
    base = _schedule(schedule_cfg, total_steps)

    def for_group(group: dict):
        spec = (unlock or {}).get(unlock_part(group.get("name", "")))
        if not spec:
            return base
        return lambda step: base(step) * unlock_factor(step, **spec)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [for_group(g) for g in optimizer.param_groups])


def group_lrs(optimizer, step: int, peak_lr: float, schedule_cfg, total_steps: int) -> dict[str, float]:
    """The learning rates of ``step`` (0-based; read before the scheduler moves past it), for the
    metrics log: ``lr`` is the schedule's, ``optim.lr * schedule_factor(step)`` before any group's
    multiplier or unlock factor, and ``lr_<part>`` each trained part's own (``lr_image``, ``lr_text``,
    ``lr_text_embeddings``, ``lr_head``; a part's decay and no-decay groups share one rate). A locked part, which never
    reaches the optimiser, has no entry; a held one reads 0."""
    out = {"lr": peak_lr * _schedule(schedule_cfg, total_steps)(step)}
    for g in optimizer.param_groups:
        out.setdefault(f"lr_{group_part(g.get('name', ''))}", g["lr"])
    return out
