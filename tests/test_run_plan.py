"""A run sized from its data where the configuration does not say: batch, steps (from epochs), warm-up;
the plan printed before step 1, the measured time per step, a warning above 50 epochs; a resumed run
keeps its plan; --help and --print-config say the rule."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import TINY, _losses, make_source  # noqa: E402

from littune.config import load_config  # noqa: E402
from littune.errors import ConfigError  # noqa: E402

#: the tiny towers of test_trainer, with the batch and the warm-up left for the data to size
SIZED = [o for o in TINY if not o.startswith(("data.batch_size=", "schedule.warmup_steps="))]


def _plan(pairs, *overrides, unit=1):
    from littune.train import run_plan

    return run_plan.make_plan(load_config(overrides=["data.cache=x", *overrides]), pairs, unit)


def _train(tmp_path, name, *overrides, trainer=None):
    from littune.train.trainer import Trainer

    cfg = load_config(overrides=SIZED + [f"run_dir={tmp_path / name}", *overrides])
    (trainer or Trainer)(cfg).run()
    return yaml.safe_load((tmp_path / name / "config.yaml").read_text())


def test_the_rule_sizes_760_pairs_to_64_x_178_steps_and_a_big_set_to_the_old_1000_x_256():
    plan = _plan(760)
    assert (plan.batch, plan.steps, plan.warmup) == (64, 178, 18)
    assert plan.line() == ("760 pairs, batch 64, 178 steps = 15.0 epochs, warm-up 18 steps (sized: data.batch_size, "
                           "steps, schedule.warmup_steps; see littune train --help)")
    assert plan.warning() is None
    big = _plan(100_000)
    assert (big.batch, big.steps, big.warmup) == (256, 1000, 100)  # the step budget: what littune always ran
    assert (_plan(17_067).steps, _plan(17_000).steps) == (1000, 996)
    assert (_plan(2048).batch, _plan(2047).batch, _plan(64).batch, _plan(10).batch) == (256, 128, 8, 2)
    assert _plan(760, unit=3).batch == 63  # grad_accum x ranks divides it


def test_given_steps_batch_warmup_and_epochs_win_over_the_rule():
    plan = _plan(760, "steps=40", "data.batch_size=16", "schedule.warmup_steps=5")
    assert (plan.batch, plan.steps, plan.warmup) == (16, 40, 5)
    assert plan.line() == "760 pairs, batch 16, 40 steps = 0.8 epochs, warm-up 5 steps"
    plan = _plan(760, "epochs=3", "schedule.warmup_fraction=0.25")
    assert (plan.batch, plan.steps, plan.warmup) == (64, 36, 9)  # round(3 x 760 / 64), a quarter of it
    assert "steps from epochs=3" in plan.line()
    plan = _plan(760, "epochs=3", "steps=100")
    assert plan.steps == 100 and "steps=100 given: epochs=3 not used" in plan.line()


def test_a_small_dataset_trains_its_sized_plan_and_prints_it_before_step_1(tmp_path, capsys, one_thread):
    src = make_source(tmp_path / "data")  # 64 images
    saved = _train(tmp_path, "run", f"data.source={src}", f"data.cache={tmp_path / 'cache'}")
    err = capsys.readouterr().err
    plan = ("littune train: 64 pairs, batch 8, 120 steps = 15.0 epochs, warm-up 12 steps (sized: data.batch_size, steps, "
            "schedule.warmup_steps; see littune train --help)")
    assert plan in err.splitlines()
    measured = re.search(r"littune train: measured: ([0-9.e-]+) s/step, about \d+ (s|min|h) left \(114 steps\) "
                         r"on this machine", err)
    assert measured and float(measured.group(1)) > 0 and err.index(plan) < measured.start()
    assert "warning" not in err
    assert (saved["steps"], saved["epochs"], saved["data"]["batch_size"]) == (120, None, 8)
    assert (saved["schedule"]["warmup_steps"], saved["schedule"]["warmup_fraction"]) == (12, 0.1)
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 120
    assert [r["lr"] for r in log[:12]] == pytest.approx([3e-3 * (s + 1) / 12 for s in range(12)])  # warm-up
    assert log[12]["lr"] == pytest.approx(3e-3) and log[13]["lr"] < 3e-3  # then the decay


def test_given_batch_steps_and_warmup_are_trained_as_given(tmp_path, capsys, one_thread):
    src = make_source(tmp_path / "data", per_class=1)  # 16 images
    saved = _train(tmp_path, "run", f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "data.batch_size=4",
                   "steps=6", "schedule.warmup_steps=2")
    assert "littune train: 16 pairs, batch 4, 6 steps = 1.5 epochs, warm-up 2 steps\n" in capsys.readouterr().err
    assert (saved["steps"], saved["data"]["batch_size"], saved["schedule"]["warmup_steps"]) == (6, 4, 2)
    assert len(_losses(tmp_path / "run")) == 6


def test_an_unlocked_tower_is_sized_from_the_captioned_records_of_its_source(tmp_path, capsys, one_thread):
    src = make_source(tmp_path / "data", per_class=1)  # 16 images: batch 2, 8 steps an epoch
    saved = _train(tmp_path, "run", f"data.source={src}", "model.setting=Uu", "data.workers=0", "epochs=1")
    assert "littune train: 16 pairs, batch 2, 8 steps = 1.0 epochs, warm-up 1 step (" in capsys.readouterr().err
    assert (saved["steps"], saved["epochs"], saved["data"]["batch_size"], saved["schedule"]["warmup_steps"]) == (8, 1, 2, 1)
    assert len(_losses(tmp_path / "run")) == 8


def test_more_than_50_epochs_warns_that_a_small_dataset_overfits(tmp_path, capsys, one_thread):
    assert _plan(760, "steps=1000", "data.batch_size=256").warning() == (
        "warning: 337 epochs: a small dataset trained this long overfits; set epochs= or steps=")
    assert _plan(760, "epochs=50").warning() is None
    src = make_source(tmp_path / "data", per_class=1)  # 16 images: 2 steps of 8 an epoch
    _train(tmp_path, "run", f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "data.batch_size=8", "steps=102")
    err = capsys.readouterr().err
    assert ("littune train: warning: 51 epochs: a small dataset trained this long overfits; set epochs= or steps="
            in err.splitlines())


def test_a_resumed_run_keeps_the_plan_in_its_config_yaml_even_where_the_rule_now_sizes_otherwise(
        tmp_path, capsys, monkeypatch, one_thread):
    from littune.train import run_plan
    from littune.train.trainer import Trainer

    class Crashing(Trainer):  # dies after step 8, as a killed run does: its checkpoint of step 5 is on disk
        def _step(self, step, batch, monitor):
            if step == 8:
                raise RuntimeError("killed")
            super()._step(step, batch, monitor)

    monkeypatch.setattr(run_plan, "DEFAULT_EPOCHS", 4)  # a short run: 32 images, batch 4, 32 steps, warm-up 3
    src = make_source(tmp_path / "data", per_class=2)
    data = (f"data.source={src}", f"data.cache={tmp_path / 'cache'}", "checkpoint_every=5")
    ref = _train(tmp_path, "ref", *data)
    assert (ref["data"]["batch_size"], ref["steps"], ref["schedule"]["warmup_steps"]) == (4, 32, 3)
    with pytest.raises(RuntimeError, match="killed"):
        _train(tmp_path, "run", *data, trainer=Crashing)
    capsys.readouterr()
    monkeypatch.setattr(run_plan, "DEFAULT_EPOCHS", 10)  # another littune's rule: batch 8, 40 steps, warm-up 4
    monkeypatch.setattr(run_plan, "STEPS_PER_EPOCH", 4)
    assert (_plan(32).batch, _plan(32).steps, _plan(32).warmup) == (8, 40, 4)
    saved = _train(tmp_path, "run", *data)  # the same command again
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 5" in err
    assert ("littune train: 32 pairs, batch 4, 32 steps = 4.0 epochs, warm-up 3 steps (kept from the run being "
            "resumed: data.batch_size, steps, schedule.warmup_steps)") in err.splitlines()
    assert {k: v for k, v in saved.items() if k != "run_dir"} == {k: v for k, v in ref.items() if k != "run_dir"}
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


def test_help_and_print_config_say_how_the_run_is_sized(capsys):
    from littune.cli import main

    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert (printed["steps"], printed["epochs"], printed["data"]["batch_size"]) == (None, None, None)
    assert (printed["schedule"]["warmup_steps"], printed["schedule"]["warmup_fraction"]) == (None, 0.1)
    assert "#   steps                  epochs x N / batch; neither set: 15 epochs, at most 1,000 steps" in \
        out.splitlines()
    assert "steps: null  # epochs x pairs / batch (see the top)" in out.splitlines()
    assert "  warmup_steps: null  # warmup_fraction x steps" in out.splitlines()
    assert main(["train", "--print-config", "--set", "steps=30"]) == 0
    assert "steps: 30" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "neither set: 15 epochs, at most 1,000 steps" in help_text
    assert "schedule.warmup_fraction (default 0.1) x steps" in help_text


@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs: must be > 0"), ("epochs=-2", "epochs: must be > 0"),
    ("schedule.warmup_fraction=1", "schedule.warmup_fraction: must be >= 0 and < 1"),
    ("schedule.warmup_fraction=-0.1", "schedule.warmup_fraction: must be >= 0 and < 1"),
    ("steps=0", "steps: must be >= 1"), ("data.batch_size=0", "data.batch_size: must be >= 1"),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps: must be >= 0"),
])
def test_bad_sizing_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["data.cache=x", override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
