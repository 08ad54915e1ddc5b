"""Optimisers, schedules and per-group learning rates."""

import math

import pytest
import torch

from littune.config import OptimSection, ScheduleSection
from littune.train.optim import build_optimizer, build_scheduler, schedule_factor


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


def test_adam_runs_fused_on_the_cpu_with_the_unfused_update(tiny_model, monkeypatch):
    """Adam and AdamW take torch's fused kernel for CPU parameters; a step moves the weights as the
    unfused optimiser does, to rounding."""
    a, b = tiny_model("Uu").double(), tiny_model("Uu").double()  # float64: no rounding noise for Adam to amplify
    b.load_state_dict(a.state_dict())
    for name in ("adamw", "adam"):
        cfg = OptimSection(name=name, lr=1e-2, weight_decay=0.1)
        fused = build_optimizer(a, cfg)
        assert all(g["fused"] for g in fused.param_groups)
        with monkeypatch.context() as m:
            m.setattr("littune.train.optim._fused", lambda groups: {})
            plain = build_optimizer(b, cfg)  # the same groups, rates and weight decays
        assert not any(g["fused"] for g in plain.param_groups)
        for _ in range(3):
            for model, opt in ((a, fused), (b, plain)):
                opt.zero_grad()
                sum(p.square().sum() for p in model.parameters()).backward()
                opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
