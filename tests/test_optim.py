"""Optimisers, schedules and per-group learning rates."""

import math

import pytest
import torch

from littune.config import OptimSection, ScheduleSection
from littune.optim import build_optimizer, build_scheduler, schedule_factor


def test_warmup_then_cosine_linear_rsqrt():
    assert schedule_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert schedule_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert schedule_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert schedule_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert schedule_factor(100, 100, 10, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert schedule_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert schedule_factor(13, 100, 10, "rsqrt") == pytest.approx(1 / math.sqrt(4))
    assert schedule_factor(50, 100, 0, "constant") == 1.0


@pytest.mark.parametrize("name", ["adamw", "adam", "adafactor"])
def test_optimizers_respect_multipliers_and_locking(tiny_model, name):
    model = tiny_model("Uu")
    opt = build_optimizer(model, OptimSection(name=name, lr=1e-3, lr_mults={"image": 0.1}))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["image"] == pytest.approx(1e-4)
    assert lrs["text"] == pytest.approx(1e-3)
    sched = build_scheduler(opt, ScheduleSection(warmup_steps=4, decay="cosine"), 20)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["text"] == pytest.approx(1e-3 / 4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["image"] == pytest.approx(1e-4)
    locked = build_optimizer(tiny_model("Lu"), OptimSection(name=name))
    assert not any(g["name"].startswith("image") for g in locked.param_groups)
