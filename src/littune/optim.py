"""Optimisers and learning-rate schedules.

The model hands out parameter groups with learning-rate multipliers (a locked tower's is 0 and it
never reaches the optimiser); each group's learning rate is ``lr * lr_mult * schedule(step)``.
The schedule is a linear warm-up followed by cosine, linear or reciprocal-square-root decay
(or constant), down to ``min_lr_ratio`` of the peak.
"""

from __future__ import annotations

import math

import torch

from .config import check_choice
from .errors import ConfigError


def build_optimizer(model, optim_cfg) -> torch.optim.Optimizer:
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
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if name == "adam":
        # Adam with decoupled weight decay off; weight decay as L2 in the gradient, as torch.optim.Adam does.
        return torch.optim.Adam(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if not hasattr(torch.optim, "Adafactor"):  # adafactor
        raise ConfigError("optim.name=adafactor needs torch >= 2.5 (torch.optim.Adafactor)")
    return torch.optim.Adafactor(groups, lr=optim_cfg.lr)


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


def build_scheduler(optimizer, schedule_cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: schedule_factor(step, total_steps, schedule_cfg.warmup_steps, schedule_cfg.decay,
                                     schedule_cfg.min_lr_ratio),
    )
