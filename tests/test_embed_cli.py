"""`littune embed`: the command, kill -9 and resume, and two torchrun (gloo) processes writing one cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import bad_inputs, tiny_tower_arg, write_csv, write_images
from littune.cache import EmbeddingCache
from littune.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _tree(d: Path) -> dict[str, bytes]:
    # .lock names whoever last held the directory (pid, host, time): not the cache's content
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_embed_command_summary_and_errors(tmp_path, capsys):
    csv_path, bad, good = bad_inputs(tmp_path / "data")
    out = tmp_path / "cache"
    rc = main(["embed", str(csv_path), "--out", str(out), "--tower", tiny_tower_arg(), "--workers", "0",
               "--views", "1", "--shard-size", "4", "-q"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"embedded 5 images (32-d float16, 1 augmented views) into {out}; skipped 5: 1 missing, "
                     f"1 empty file, 1 not an image, 1 truncated, 1 too many pixels (see {out / 'skipped.tsv'})"]
    cache = EmbeddingCache.open(out)
    assert len(cache) == 5 and cache.views == 1
    # a second run finds the cache complete and changes nothing
    before = _tree(out)
    assert main(["embed", str(csv_path), "--out", str(out), "--tower", tiny_tower_arg(), "--views", "1",
                 "--shard-size", "4", "-q", "--workers", "0"]) == 0
    assert _tree(out) == before
    capsys.readouterr()
    # user errors: one line, exit 2
    assert main(["embed", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"littune embed: error: source not found: {tmp_path / 'nope.csv'}"]
    assert main(["embed", str(csv_path), "--out", str(out), "--tower", "{not json"]) == 2
    assert "--tower: not valid JSON" in capsys.readouterr().err
    assert main(["embed", str(csv_path), "--out", str(out), "--tower", tiny_tower_arg(), "--shard-size", "3",
                 "-q"]) == 2
    assert "shard_size 4 -> 3" in capsys.readouterr().err


def test_all_images_bad_is_an_error_after_the_report(tmp_path, capsys):
    (tmp_path / "a.png").write_text("not a png")
    (tmp_path / "list.csv").write_text("image,caption\na.png,x\nb.png,y\n")
    rc = main(["embed", str(tmp_path / "list.csv"), "--out", str(tmp_path / "c"), "--tower", tiny_tower_arg(),
               "--workers", "0", "-q"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "embedded 0 images" in captured.out and "1 missing, 1 not an image" in captured.out
    assert "none of the 2 images" in captured.err
    assert len(EmbeddingCache.open(tmp_path / "c")) == 0


def test_images_without_a_caption_are_counted_not_nothing_skipped(tmp_path, capsys):
    """`good_2.png,` (an empty caption) is embedded for search but reported and never trained on."""
    write_images(tmp_path / "img", 3)
    rows = ["image,caption", "img/im0000.png,a red thing", "img/im0001.png,", "img/im0002.png,a blue thing"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "c"
    args = ["embed", str(tmp_path / "list.csv"), "--tower", tiny_tower_arg(), "--workers", "0", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"embedded 3 images (32-d float16) into {out}; 1 without a caption (not trained on, see {out / 'skipped.tsv'})"]
    assert (out / "skipped.tsv").read_text().splitlines()[1].split("\t")[:2] == [str(tmp_path / "img" / "im0001.png"),
                                                                                "no-caption"]
    # with images that fail too: both are counted (a missing file without a caption is "missing")
    (tmp_path / "list.csv").write_text("\n".join(rows + ["img/gone.png,"]) + "\n")
    assert main([*args, "--out", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"embedded 3 images (32-d float16) into {tmp_path / 'd'}; 1 without a caption (not trained on); "
        f"skipped 1: 1 missing (see {tmp_path / 'd' / 'skipped.tsv'})"]


def test_embed_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = capsys.readouterr().out
    assert "littune embed data/train.csv" in text and "--views" in text and "resumable" in text


def test_kill_minus_9_and_resume_gives_identical_cache(tmp_path):
    """SIGKILL `littune embed` twice mid-run; the resumed cache equals an uninterrupted run byte for byte."""
    root = tmp_path / "data"
    n = 480
    write_images(root / "img", n, ext="jpg", size=(320, 240))
    with open(root / "pairs.csv", "w") as f:
        f.write("image,caption\n")
        for i in range(n):
            f.write(f"img/im{i:04d}.jpg,photo {i}\nimg/im{i:04d}.jpg,another caption {i % 7}\n")
    args = [str(root / "pairs.csv"), "--tower", tiny_tower_arg(), "--shard-size", "16", "--batch-size", "5",
            "--views", "1", "--threads", "1", "--workers", "1", "-q"]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "littune", "embed", *args, "--out", str(out)]
    kills = 0
    for wait_for in (2, 9):  # kill after the 2nd shard, then after the 9th
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("*.json"))) >= wait_for if (out / "shards").is_dir() else False:
                break
            time.sleep(0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
        assert proc.returncode == -signal.SIGKILL
    assert kills == 2
    done_before = len(list((out / "shards").glob("*.json")))
    assert 9 <= done_before < n // 16
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"embedded {n} images")
    # the reference: one uninterrupted run (in this process) that computes every row (it could copy them from
    # the killed run's cache otherwise)
    ref = tmp_path / "reference"
    assert main(["embed", *args, "--out", str(ref), "--no-reuse"]) == 0
    killed, clean = _tree(out), _tree(ref)
    assert sorted(killed) == sorted(clean)
    assert [k for k in clean if killed[k] != clean[k]] == []
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.distributed
def test_torchrun_two_gloo_processes_write_the_same_cache(tmp_path):
    src = write_csv(tmp_path / "data", n=22)
    write_images(tmp_path / "data" / "img", 1, start=22)  # not listed: ignored
    args = [str(src), "--tower", tiny_tower_arg(), "--shard-size", "3", "--views", "2", "--threads", "1",
            "--workers", "0", "-q"]
    one = tmp_path / "one"
    assert main(["embed", *args, "--out", str(one)]) == 0
    two = tmp_path / "two"
    env = _env()
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "littune", "embed", *args, "--out", str(two)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("embedded 22 images") == 1  # rank 0 prints the summary
    metas = [(two / "shards" / f"{s:05d}.json").read_text() for s in range(8)]
    assert len(metas) == 8
    a, b = _tree(one), _tree(two)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    c = EmbeddingCache.open(two)
    np.testing.assert_array_equal(c.features(np.arange(22), view=1),
                                  EmbeddingCache.open(one).features(np.arange(22), view=1))


def test_a_file_name_that_is_not_utf8_is_left_out_reported_and_the_rest_embedded(tmp_path, capsys):
    """One non-UTF-8 name failed the whole folder with "surrogates not allowed", naming no file."""
    root = tmp_path / "photos"
    write_images(root, 3)
    bad = os.path.join(os.fsencode(root), b"x\xff\xfe.png")
    with open(bad, "wb") as f:
        f.write((root / "im0000.png").read_bytes())
    out = tmp_path / "cache"
    assert main(["embed", str(root), "--out", str(out), "--tower", tiny_tower_arg(), "--workers", "0", "-q"]) == 0
    captured = capsys.readouterr()
    shown = f"{root}/x\\xff\\xfe.png"
    assert captured.err.splitlines() == [f"littune embed: left out 1 file whose name is not UTF-8: {shown} "
                                         f"(rename it to include it; listed in {out / 'skipped.tsv'})"]
    assert "embedded 3 images" in captured.out and "1 index problem" in captured.out
    cache = EmbeddingCache.open(out)
    assert [cache.key(i) for i in range(len(cache))] == ["im0000.png", "im0001.png", "im0002.png"]
    rows = (out / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[1].startswith(f"{shown}\tindex\tfile name is not UTF-8")


def _can_mount_tmpfs(tmp_path) -> bool:
    """Whether this machine lets an unprivileged user+mount namespace mount a small tmpfs (a real full disk)."""
    import shutil

    if not shutil.which("unshare"):
        return False
    (tmp_path / "probe").mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {tmp_path / 'probe'}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_a_full_disk_is_one_line_saying_what_was_written_and_the_run_resumes(tmp_path):
    """ENOSPC was a traceback. Now: one line naming the complete shards, and the same command finishes
    the cache (copied off the full disk) into one identical to an uninterrupted run."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    write_images(tmp_path / "img", 12)
    small, saved, whole = tmp_path / "small", tmp_path / "saved", tmp_path / "whole"
    small.mkdir()
    args = ["--tower", tiny_tower_arg(), "--workers", "0", "--shard-size", "1", "--runtime", "torch", "-q"]
    embed = " ".join(f"'{a}'" for a in [sys.executable, "-m", "littune", "embed", str(tmp_path / "img"), *args])
    script = (f"mount -t tmpfs -o size=48k tmpfs {small} && {embed} --out {small}/cache; rc=$?; "
              f"cp -a {small}/cache {saved}; exit $rc")
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(),
                         timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("littune embed: error: disk full"), run.stderr[-3000:]
    done = sum(1 for p in (saved / "shards").glob("*.json"))
    assert 0 < done < 12
    assert f"writing the cache {small}/cache: {done} of 12 shards are complete and kept" in err[0]
    assert "free some space and run the same command again to resume" in err[0]
    assert main(["embed", str(tmp_path / "img"), *args, "--out", str(saved)]) == 0
    assert main(["embed", str(tmp_path / "img"), *args, "--out", str(whole)]) == 0
    a, b = EmbeddingCache.open(saved), EmbeddingCache.open(whole)
    assert len(a) == len(b) == 12 and np.array_equal(a.features(np.arange(12)), b.features(np.arange(12)))
