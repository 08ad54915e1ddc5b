"""Resuming a run: exact after a signal at any point of a step, one writer per run directory, metrics
that read as one run, a tokenizer that matches its data, and files that are never half-written.

Crashes are real: a process killed at a chosen file operation (an audit hook sends SIGKILL), a full
disk (a file-size limit, ``RLIMIT_FSIZE``: the write fails part-way as on a full disk), signals sent
by the process to itself at chosen points of a step.
"""

import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import TINY, make_source

from littune.cli import main
from littune.config import load_config
from littune.errors import ConfigError, LittuneError
from littune.train.monitor import truncate_metrics
from littune.train.trainer import Trainer


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A source, its cache (built by the reference run) and an uninterrupted reference run of 8 steps."""
    root = tmp_path_factory.mktemp("resume")
    src = make_source(root / "data", per_class=2)
    data = {"src": src, "cache": root / "cache", "run": root / "ref"}
    Trainer(_cfg(data, root / "ref")).run()
    return data


def _cfg(data, run_dir, *extra, steps=8):
    return load_config(overrides=TINY + [f"run_dir={run_dir}", f"data.source={data['src']}",
                                         f"data.cache={data['cache']}", f"steps={steps}", "checkpoint_every=2", *extra])


def _records(run_dir: Path, name="metrics.jsonl") -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / name).read_text().splitlines()]


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in rb] == list(range(1, len(ra) + 1))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


class SignalAt(Trainer):
    """Sends ``signum`` to this process at ``point`` of the step ``at`` (0-based), as Ctrl-C or a
    scheduler's SIGTERM would arrive there."""

    def __init__(self, cfg, point: str, at: int, signum=signal.SIGTERM):
        super().__init__(cfg)
        self.point, self.at, self.signum, self.current = point, at, signum, -1

    def _fire(self, point: str) -> None:
        if point == self.point and self.current == self.at:
            os.kill(os.getpid(), self.signum)

    def _after(self, obj, name: str, point: str) -> None:
        original = getattr(obj, name)

        @functools.wraps(original)  # with the marks the LR scheduler put on optimizer.step
        def wrapped(*args, **kw):
            out = original(*args, **kw)
            self._fire(point)
            return out

        setattr(obj, name, wrapped)

    def _build_training(self):
        start = super()._build_training()
        self._after(self.optimizer, "step", "optimizer.step")
        self._after(self.optimizer, "zero_grad", "zero_grad")
        base, fire = type(self.scheduler), self._fire

        class Hooked(base):  # on the class: the scheduler's state_dict holds its instance attributes
            def step(self, *args, **kw):
                base.step(self, *args, **kw)
                fire("scheduler.step")

        self.scheduler.__class__ = Hooked
        return start

    def _step(self, step, batch, monitor):
        self.current = step
        super()._step(step, batch, monitor)

    def train_step(self, batch):
        self._fire("forward")
        return super().train_step(batch)

    def _record(self, *args):
        out = super()._record(*args)
        self._fire("metrics")
        return out

    def _checkpoint(self, step):
        super()._checkpoint(step)
        self._fire("checkpoint")


class CrashAt(Trainer):
    """Dies at the start of step ``at`` (0-based) as a power cut would: no checkpoint, nothing more."""

    def __init__(self, cfg, at: int):
        super().__init__(cfg)
        self.at = at

    def _step(self, step, batch, monitor):
        if step == self.at:
            raise RuntimeError("power cut")
        super()._step(step, batch, monitor)


POINTS = [("forward", signal.SIGTERM), ("optimizer.step", signal.SIGTERM), ("optimizer.step", signal.SIGINT),
          ("scheduler.step", signal.SIGTERM), ("zero_grad", signal.SIGTERM), ("metrics", signal.SIGTERM),
          ("checkpoint", signal.SIGTERM)]


@pytest.mark.parametrize("point,signum", POINTS, ids=[f"{p}-{s.name}" for p, s in POINTS])
def test_a_signal_at_any_point_of_a_step_resumes_bit_identically(ref, tmp_path, point, signum):
    run = tmp_path / "run"
    at = 3 if point == "checkpoint" else 4  # the checkpoint of step 4 is written during step index 3
    with pytest.raises(KeyboardInterrupt):
        SignalAt(_cfg(ref, run), point, at, signum).run()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (run / "model").exists()
    # The step under way completed and the checkpoint is of the step boundary after it.
    assert _checkpoints(run)[-1] == f"step_{at + 1:07d}"
    assert [r["step"] for r in _records(run)] == list(range(1, at + 2))
    Trainer(_cfg(ref, run)).run()
    _assert_same_run(ref["run"], run)


def test_a_restart_before_the_first_checkpoint_logs_each_step_once(ref, tmp_path):
    run = tmp_path / "run"
    val = (f"val.retrieval=[{{name: train, cache: '{ref['cache']}'}}]", "val.every=2", "checkpoint_every=5")
    with pytest.raises(RuntimeError, match="power cut"):
        CrashAt(_cfg(ref, run, *val), at=3).run()  # steps 1-3 and validation 2 logged, no checkpoint
    assert [r["step"] for r in _records(run)] == [1, 2, 3] and not (run / "checkpoints").exists()
    Trainer(_cfg(ref, run, *val)).run()
    _assert_same_run(ref["run"], run)
    assert [r["step"] for r in _records(run, "val.jsonl")] == [2, 4, 6, 8]


def _tokenizer(run_dir: Path) -> dict:
    return json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())


def _text_tower(vocab: int) -> str:
    return ("model.text_tower={type: transformer, width: 32, depth: 1, heads: 2, context_length: 12, "
            f"vocab_size: {vocab}}}")


def _vocab(tokenizer: dict) -> tuple:
    return tokenizer["model"]["vocab"], tokenizer["model"]["merges"]


def test_a_stale_tokenizer_is_retrained_or_refused(ref, tmp_path, capsys):
    from littune.cache import EmbeddingCache
    from littune.towers.text import train_tokenizer

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        CrashAt(_cfg(ref, run, _text_tower(300)), at=1).run()  # killed before its first checkpoint
    assert len(_tokenizer(run)["model"]["vocab"]) == 300
    # Another vocab_size: the tokenizer left behind is made again, the same as a fresh run's.
    Trainer(_cfg(ref, run, _text_tower(280), steps=2)).run()
    Trainer(_cfg(ref, tmp_path / "fresh", _text_tower(280), steps=2)).run()
    assert _tokenizer(run) == _tokenizer(tmp_path / "fresh")
    assert len(_tokenizer(run)["model"]["vocab"]) == 280
    assert "training a new one" in capsys.readouterr().err
    # The same source and cache paths, other captions: made again before a checkpoint, refused after one.
    shutil.copytree(ref["src"].parent, tmp_path / "data2")
    other = dict(ref, cache=tmp_path / "cache2", src=tmp_path / "data2" / "pairs.csv")
    run2 = tmp_path / "run2"
    with pytest.raises(RuntimeError, match="power cut"):
        CrashAt(_cfg(other, run2, _text_tower(300)), at=1).run()
    before = _tokenizer(run2)
    csv = other["src"].read_text().replace(",a ", ",one ").replace(" in ", " inside ")
    other["src"].write_text(csv)
    shutil.rmtree(other["cache"])
    with pytest.raises(RuntimeError, match="power cut"):  # stopped after its step-4 checkpoint, unfinished
        CrashAt(_cfg(other, run2, _text_tower(300)), at=5).run()
    want = train_tokenizer(EmbeddingCache.open(other["cache"]).iter_captions(), vocab_size=300)
    assert _vocab(_tokenizer(run2)) == _vocab(json.loads(want.backend_tokenizer.to_str())) != _vocab(before)
    other["src"].write_text(csv.replace(" inside ", " within "))
    shutil.rmtree(other["cache"])
    with pytest.raises(LittuneError, match="tokenizer.*captions.*checkpoints"):
        Trainer(_cfg(other, run2, _text_tower(300))).run()


def test_a_changed_steps_on_resume_is_refused(ref, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(ref, run, steps=4)).run()
    for steps in (2, 6):
        with pytest.raises(ConfigError, match=f"steps=4.*checkpoint at step 4.*steps={steps}"):
            Trainer(_cfg(ref, run, steps=steps)).run()
    (run / "config.yaml").unlink()  # with no record of steps, the checkpoint's step still bounds it
    with pytest.raises(ConfigError, match="checkpoint at step 4; resuming it with steps=2 would end before it"):
        Trainer(_cfg(ref, run, steps=2)).run()
    assert _checkpoints(run) == ["step_0000002", "step_0000004"]


def test_the_same_run_dir_spelled_or_placed_differently_resumes(ref, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Trainer(_cfg(ref, "run", steps=4)).run()
    for spelling in (tmp_path / "run", "./run", "run/"):
        Trainer(_cfg(ref, spelling, steps=4)).run()
    shutil.copytree(tmp_path / "run", tmp_path / "copied")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    for where in ("copied", tmp_path / "moved"):
        capsys.readouterr()
        Trainer(_cfg(ref, where, steps=4)).run()
        assert "at step 4" in capsys.readouterr().err


def _cli(run_dir: Path, data: dict, *extra, steps=8) -> subprocess.Popen:
    """``littune train`` in another process."""
    return subprocess.Popen([sys.executable, "-m", "littune", *_train_args(data, run_dir, steps, *extra)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _train_args(data: dict, run_dir: Path, steps: int, *extra) -> list[str]:
    overrides = TINY + [f"run_dir={run_dir}", f"data.source={data['src']}", f"data.cache={data['cache']}",
                        f"steps={steps}", "checkpoint_every=2", *extra]
    return ["train"] + [a for o in overrides for a in ("--set", o)]


@contextlib.contextmanager
def _file_size_limit(size: int):
    """In this process, for the block: a write past ``size`` bytes of a file fails part-way with EFBIG,
    as one on a full disk fails with ENOSPC (SIGXFSZ, which would end the process, is ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _error_line(stderr: str) -> str:
    """The one line that says what went wrong (no traceback); other lines are the run's progress notes."""
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("littune train: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_a_second_run_into_the_same_run_dir_is_refused_naming_the_first(ref, tmp_path):
    from littune.train.rundir import close_run_dir, open_run_dir

    run = tmp_path / "run"
    Trainer(_cfg(ref, run, steps=4)).run()
    held = open_run_dir(run)  # this process holds the run directory, as a run in progress does
    try:
        second = _cli(Path(os.path.relpath(run)), ref, steps=4)  # the same folder, spelled otherwise
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        err = _error_line(err)
        holder = f"(pid {os.getpid()} on "
        assert f"run directory {os.path.relpath(run)} is being written by another `littune train` {holder}" in err
    finally:
        close_run_dir(held)
    Trainer(_cfg(ref, run, steps=4)).run()  # free again


def test_an_incomplete_last_metrics_line_is_dropped_on_resume(ref, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        CrashAt(_cfg(ref, run), at=5).run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # what a full disk leaves
    Trainer(_cfg(ref, run)).run()
    _assert_same_run(ref["run"], run)
    assert "metrics.jsonl: dropped an incomplete last line" in capsys.readouterr().err


def test_a_full_disk_never_leaves_half_a_metrics_line(ref, tmp_path, capsys):
    run = tmp_path / "run"
    with _file_size_limit(9000):  # more than tokenizer.json; metrics.jsonl reaches it part-way through a line
        assert main(_train_args(ref, run, 200, "checkpoint_every=0")) == 2
    err = _error_line(capsys.readouterr().err)
    assert "metrics.jsonl" in err and "File too large" in err
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and 20 < len(text.splitlines()) < 200
    assert [json.loads(ln)["step"] for ln in text.splitlines()] == list(range(1, len(text.splitlines()) + 1))


def test_a_failed_checkpoint_is_one_line_leaves_nothing_behind_and_keeps_the_previous(ref, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="power cut"):
        CrashAt(_cfg(ref, run), at=5).run()
    assert _checkpoints(run) == ["step_0000002", "step_0000004"]
    capsys.readouterr()
    with _file_size_limit(150_000):  # model.safetensors (92 kB) fits, trainer.pt (200 kB) does not
        assert main(_train_args(ref, run, 8)) == 2
    err = _error_line(capsys.readouterr().err)
    assert "checkpoint of step 6 was not written (File too large)" in err
    assert f"{run / 'checkpoints' / 'step_0000004'} is intact" in err
    assert _checkpoints(run) == ["step_0000002", "step_0000004"]  # no .tmp-step_0000006-PID left
    Trainer(_cfg(ref, run)).run()
    _assert_same_run(ref["run"], run)


def test_temporary_checkpoints_of_dead_processes_are_removed_at_start(ref, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(ref, run, steps=4)).run()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / "checkpoints" / f".tmp-step_0000004-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    Trainer(_cfg(ref, run, steps=4)).run()
    assert _checkpoints(run) == ["step_0000002", "step_0000004"]


KILL_AT = """
import errno, os, signal, sys
# kind train|model: SIGKILL this process when it renames a file or folder named argv[1] (either side);
# kind enospc: the disk is full when it opens argv[1] inside a temporary folder.
name, kind = sys.argv[1], sys.argv[2]
def hook(event, args):
    if kind != "enospc" and event == "os.rename" and name in (os.path.basename(args[0]), os.path.basename(args[1])):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "enospc" and event == "open" and os.path.basename(str(args[0])) == name and ".tmp-" in str(args[0]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), args[0])
sys.addaudithook(hook)
if kind in ("train", "enospc"):
    from littune.cli import main
    sys.exit(main(sys.argv[3:]))
sys.path.insert(0, {tests!r})
from conftest import CAPTIONS, TINY_TEXT
from littune import LiTConfig, LiTModel
from littune.towers.tiny import SPEC
cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
LiTModel.from_config(cfg, captions=[c.upper() + " photo" for c in CAPTIONS]).save_pretrained(sys.argv[3])
"""


def _killed_at(name: str, kind: str, *args) -> subprocess.CompletedProcess:
    script = KILL_AT.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script, name, kind, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert kind == "enospc" or done.returncode == -signal.SIGKILL, done.stderr
    return done


def test_resaving_a_checkpoint_never_loses_it(ref, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(_cfg(ref, run, steps=4)).run()
    before = (run / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "model")  # unfinished again (a finished run run again does nothing)
    # Run again: it re-saves the last checkpoint, and is killed as the new copy takes its name.
    _killed_at("step_0000004", "train", *_train_args(ref, run, 4))
    capsys.readouterr()
    Trainer(_cfg(ref, run, steps=4)).run()
    assert f"resumed from {run / 'checkpoints' / 'step_0000004'} at step 4" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000004" / "model.safetensors").read_bytes() == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_save_pretrained_replaces_a_model_folder_whole(tiny_model, tmp_path):
    out = tmp_path / "model"
    tiny_model().save_pretrained(out)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    # Another model (another tokenizer) saved over it, killed as its weights file takes its name.
    _killed_at("model.safetensors", "model", out)
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    with pytest.raises(LittuneError, match="not a littune model"):
        tiny_model().save_pretrained(tmp_path)  # a folder with other things in it is not replaced
    tiny_model().save_pretrained(out)  # a later save clears what the killed one left beside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_full_disk_while_writing_the_model_is_one_line_and_keeps_the_old_model(ref, tmp_path):
    run = tmp_path / "run"
    Trainer(_cfg(ref, run, steps=4)).run()
    before = {p.relative_to(run): p.read_bytes() for p in sorted((run / "model").rglob("*")) if p.is_file()}
    old = (run / "checkpoints").stat().st_mtime - 60  # model/ older than the last checkpoint: the run is
    os.utime(run / "model" / "config.json", (old, old))  # not finished, so running it again writes model/
    done = _killed_at("config.json", "enospc", *_train_args(ref, run, 4))
    assert done.returncode == 2
    assert f"{run / 'model'} was not written (No space left on device)" in _error_line(done.stderr)
    assert {p.relative_to(run): p.read_bytes() for p in sorted((run / "model").rglob("*")) if p.is_file()} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_cutting_metrics_back_on_a_full_disk_keeps_them(ref, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ref["run"], run)
    before = (run / "metrics.jsonl").read_bytes()
    assert len(before) > 1200
    with _file_size_limit(600), pytest.raises(LittuneError, match="could not rewrite .*metrics.jsonl .*kept as it was"):
        truncate_metrics(run, 6)  # six lines: more than 600 bytes
    assert (run / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]
