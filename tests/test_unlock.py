"""Delayed unlocking (optim.unlock): a group held as locked, then ramped to its learning rate."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _cfg, _losses, make_source  # noqa: E402

from littune.config import OptimSection, ScheduleSection, load_config  # noqa: E402
from littune.errors import ConfigError  # noqa: E402
from littune.train.optim import build_optimizer, build_scheduler, held_groups  # noqa: E402

UU = ("model.setting=Uu", "data.workers=0")


def test_unlock_factor_holds_then_ramps_only_the_named_group(tiny_model):
    opt = build_optimizer(tiny_model("Uu"), OptimSection(lr=1e-3, lr_mults={"image": 0.5}))
    sched = build_scheduler(opt, ScheduleSection(warmup_steps=0, decay="constant"), 20,
                            {"image": {"after": 3, "ramp": 4}})
    seen = []
    for _ in range(8):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    want = [0, 0, 0, 0.25, 0.5, 0.75, 1, 1]
    for part in ("image", "image_no_decay"):
        assert [s[part] for s in seen] == pytest.approx([5e-4 * f for f in want])
    assert [s["text"] for s in seen] == pytest.approx([1e-3] * 8)
    assert [held_groups({"image": {"after": 3, "ramp": 4}}, s) for s in range(5)] == [{"image"}] * 3 + [set()] * 2


def test_set_builds_an_unlock_entry_key_by_key():
    cfg = load_config(overrides=["model.setting=Uu", "optim.unlock.image.after=3", "optim.unlock.image.ramp=2",
                                 "data.cache=x"])
    assert cfg.optim.unlock == {"image": {"after": 3, "ramp": 2}}


@pytest.mark.parametrize("accum", [1, 2])
def test_a_delayed_image_tower_is_bit_identical_in_eval_mode_without_gradients_until_it_unlocks(tmp_path, accum):
    from littune.train.trainer import Trainer

    seen = []

    class Recording(Trainer):
        def train_step(self, batch):
            tower = self.model.image_tower
            state = {k: v.clone() for k, v in tower.state_dict().items()}
            text = {k: v.clone() for k, v in self.model.text_tower.state_dict().items()}
            loss = super().train_step(batch)
            seen.append((state, text, tower.training, any(p.grad is not None for p in tower.parameters())))
            return loss

    src = make_source(tmp_path / "data", per_class=2)
    Recording(_cfg(tmp_path, *UU, f"data.source={src}", "steps=5", f"grad_accum={accum}",
                        "optim.unlock={image: {after: 3}}")).run()
    assert [s[2] for s in seen] == [False, False, False, True, True]  # eval mode while held
    assert [s[3] for s in seen] == [False, False, False, True, True]  # no gradient while held
    before, after = seen[0][0], seen[3][0]  # before step 0, and after steps 0-2 (held)
    assert any(k.endswith("running_mean") for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for k in ("net.0.weight", "net.1.running_mean", "net.1.num_batches_tracked"):  # moved by step 3
        assert not torch.equal(seen[3][0][k], seen[4][0][k]), k
    assert any(not torch.equal(seen[0][1][k], seen[3][1][k]) for k in seen[0][1])  # the text tower trained


def test_resume_while_held_and_mid_ramp_equals_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from littune.train.trainer import Trainer

    class StopsAt(Trainer):
        stop_at = None

        def _step(self, step, batch, monitor):
            if step == self.stop_at:
                raise KeyboardInterrupt  # the trainer's Ctrl-C path: checkpoint at the steps done, re-raise
            super()._step(step, batch, monitor)

    src = make_source(tmp_path / "data", per_class=2)
    common = (*UU, f"data.source={src}", "steps=7", "checkpoint_every=0", "optim.unlock={image: {after: 2, ramp: 3}}")
    ref = tmp_path / "ref"
    Trainer(_cfg(ref, *common)).run()
    run = tmp_path / "stopped"
    for stop in (1, 3):  # held at step 1; factor 1/3 at step 2, so step 3 resumes mid-ramp
        trainer = StopsAt(_cfg(run, *common))
        trainer.stop_at = stop
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
    Trainer(_cfg(run, *common)).run()
    a = load_file(str(ref / "run" / "model" / "model.safetensors"))
    b = load_file(str(run / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("image_tower.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(ref / "run") == _losses(run / "run")


@pytest.mark.parametrize("overrides, message", [
    (["model.setting=Lu", "optim.unlock={image: {after: 3}}"], "optim.unlock.image: the image tower is locked in setting Lu"),
    (["optim.unlock={imag: {after: 3}}"], "optim.unlock.imag: unknown group; use image, text, head"),
    (["model.setting=Uu", "optim.unlock={image: 3}"], "optim.unlock.image: expected a mapping"),
    (["model.setting=Uu", "optim.unlock={image: {aftr: 3}}"], "optim.unlock.image.aftr: unknown key"),
    (["model.setting=Uu", "optim.unlock={image: {after: -1}}"], r"optim.unlock.image.after: expected an integer >= 0"),
    (["model.setting=Uu", "optim.unlock={image: {ramp: 0.5}}"], r"optim.unlock.image.ramp: expected an integer"),
    (["model.setting=Uu", "steps=10", "optim.unlock={image: {after: 10}}"], r"after: 10 >= steps \(10\)"),
    (["model.setting=Uu", "optim.lr_mults={image: 0}", "optim.unlock={image: {after: 1}}"],
     "optim.lr_mults.image is 0"),
    (["model.setting=LL", "optim.unlock={head: {after: 1}}"], "every trainable group starts held"),
    (["optim.unlock=5"], "optim.unlock: expected a mapping"),
])
def test_bad_unlock_configuration_is_a_one_line_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=[*overrides, "data.cache=x"])
    assert "\n" not in str(e.value)


def test_metrics_log_each_parts_lr_and_a_held_image_tower_reads_zero_there(tmp_path):
    import json

    from littune.train.optim import schedule_factor
    from littune.plots import lr_series
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data", per_class=2)
    cfg = _cfg(tmp_path, *UU, f"data.source={src}", "steps=6", "optim.lr_mults={image: 0.1}",
               "optim.unlock={image: {after: 3, ramp: 2}}", "schedule.warmup_steps=2", "schedule.decay=linear")
    Trainer(cfg).run()
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sched = [3e-3 * schedule_factor(s, 6, 2, "linear") for s in range(6)]  # the rate each step trained at
    assert [r["lr"] for r in log] == pytest.approx(sched)  # the schedule's, not the (held) first group's
    assert [r["lr_text"] for r in log] == pytest.approx(sched)
    assert [r["lr_head"] for r in log] == pytest.approx(sched)
    assert [r["lr_image"] for r in log] == pytest.approx([0.1 * f * u for f, u in zip(sched, [0, 0, 0, 0.5, 1, 1])])
    assert set(lr_series(log)) == {"lr", "lr_image", "lr_text", "lr_head"}
    assert lr_series([{"step": 1, "loss": 1.0, "lr": 0.5}]) == {"lr": [(1, 0.5)]}  # an older log plots as before


def test_a_locked_part_has_no_lr_entry(tiny_model):
    from littune.train.optim import group_lrs

    opt = build_optimizer(tiny_model("Lu"), OptimSection(lr=1e-3, lr_mults={"text": 0.5}))
    got = group_lrs(opt, 0, 1e-3, ScheduleSection(warmup_steps=0, decay="constant"), 10)
    assert got == pytest.approx({"lr": 1e-3, "lr_text": 5e-4, "lr_head": 1e-3})
