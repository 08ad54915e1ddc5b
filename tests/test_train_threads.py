"""``littune train --threads N``: torch's intra-op threads while training, a bad value one line, and the
default (every core this process may use, less the decoding workers when the image tower runs each step)."""

from __future__ import annotations

import pytest
import torch

from littune import cli
from littune.cache import workers as W
from littune.config import load_config
from test_trainer import TINY, make_source


@pytest.fixture
def threads_back():
    """Give torch its thread count back after a test that sets it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _args(tmp_path, *extra):
    src = make_source(tmp_path / "data", per_class=1)
    out = []
    for o in TINY + [f"data.source={src}", f"data.cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
                     "steps=2", "data.batch_size=8", *extra]:
        out += ["--set", o]
    return out


def test_threads_option_is_what_torch_trains_with(tmp_path, monkeypatch, threads_back):
    from littune.train.trainer import Trainer

    seen = []
    step = Trainer.train_step

    def counted(self, batch):
        seen.append(torch.get_num_threads())
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", counted)
    want = threads_back + 1  # not what torch had: the option must be what changed it
    assert cli.main(["train", "--threads", str(want), *_args(tmp_path)]) == 0
    assert seen == [want, want]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_a_one_line_error_before_any_work(tmp_path, capsys, value, threads_back):
    assert cli.main(["train", "--threads", value, *_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"littune train: error: --threads must be at least 1, not {value}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    assert torch.get_num_threads() == threads_back


@pytest.mark.parametrize("extra, want", [
    ([], 4),  # from the cache: one thread a core (the batch-making thread mostly waits)
    (["model.setting=Uu", "data.workers=1"], 3),  # the tower every step: a core for the decoding worker
    (["data.on_the_fly=true", "data.workers=2"], 2),
    (["model.setting=Uu", "data.workers=0"], 4),  # decoded in the training process
])
def test_default_threads_are_the_cores_less_the_decoding_workers(monkeypatch, extra, want, threads_back):
    from littune.commands.train import set_threads

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda _pid: set(range(4)))
    cfg = load_config(overrides=TINY + ["data.cache=c", "data.source=s.csv", *extra])
    assert set_threads(cfg, None) == want == torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's share for each rank
    assert set_threads(cfg, None) == 1 == torch.get_num_threads()
    assert set_threads(cfg, 3) == 3 == torch.get_num_threads()
