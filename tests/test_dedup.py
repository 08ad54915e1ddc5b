"""Near-duplicate removal: planted copies of evaluation images are found (and nothing else), the CLI
writes the list, and training from the cache never samples a listed image."""

import numpy as np
import pytest

from littune.train.batches import CacheBatches
from littune.cache import write_cache
from littune.cli import main
from littune.data.dedup import HEADER, excluded_rows, near_duplicates, read_keys, write_list
from littune.errors import ConfigError, LittuneError
from littune.towers.tiny import SPEC

DIM = 32
PLANTED = {3: ("a", 0), 17: ("a", 9), 40: ("b", 2), 41: ("b", 2), 88: ("a", 19), 150: ("b", 14), 199: ("a", 4)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Two evaluation caches (20 and 15 images) and a training cache of 200 whose rows in PLANTED are
    rescaled copies, plus noise, of evaluation images; every other row is random (cosine ~ N(0, 1/32))."""
    root = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(0)
    ev = {"a": rng.standard_normal((20, DIM)), "b": rng.standard_normal((15, DIM))}
    train = rng.standard_normal((200, DIM))
    for row, (c, e) in PLANTED.items():
        train[row] = 1.7 * ev[c][e] + 0.02 * rng.standard_normal(DIM)
    caps = {"a": [f"a{i}" for i in range(20)], "b": [f"b{i}" for i in range(15)]}
    out = {c: write_cache(root / c, ev[c].astype(np.float32), caps[c], SPEC,
                          keys=[f"{c}/{i:03d}" for i in range(len(ev[c]))]) for c in ev}
    keys = [f"img/{i:04d}.png" for i in range(200)]
    out["train"] = write_cache(root / "train", train.astype(np.float32), keys, SPEC, keys=keys, shard_size=64)
    out["arrays"] = {"train": train, **ev}
    return out


def test_planted_duplicates_are_found_and_nothing_else(caches):
    found = near_duplicates(caches["train"], [caches["a"], caches["b"]], threshold=0.9)
    assert [d.train_row for d in found] == sorted(PLANTED)
    for d in found:
        c, e = PLANTED[d.train_row]
        assert (d.train_key, d.eval_cache, d.eval_key) == (f"img/{d.train_row:04d}.png", str(caches[c].directory),
                                                           f"{c}/{e:03d}")
        assert 0.99 < d.cosine <= 1.0 + 1e-6
    # The unplanted rows' best cosine (brute force on the float16-stored features) stays far below.
    arr = caches["arrays"]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    best = (unit(caches["train"].features(range(200))) @ unit(np.concatenate([arr["a"], arr["b"]])).T).max(1)
    assert best[sorted(PLANTED)].min() > 0.99 and np.delete(best, sorted(PLANTED)).max() < 0.8


def test_chunk_size_changes_nothing(caches):
    evals = [caches["a"], caches["b"]]
    ref = near_duplicates(caches["train"], evals, threshold=0.5, chunk_rows=200)
    assert len(ref) >= len(PLANTED)
    for chunk in (1, 7, 64, 10_000):
        got = near_duplicates(caches["train"], evals, threshold=0.5, chunk_rows=chunk)
        assert [(d.train_row, d.eval_cache, d.eval_key) for d in got] == \
            [(d.train_row, d.eval_cache, d.eval_key) for d in ref]
        np.testing.assert_allclose([d.cosine for d in got], [d.cosine for d in ref], atol=1e-6)


def test_a_threshold_above_every_score_finds_none_and_bad_input_is_one_line(caches, tmp_path):
    assert near_duplicates(caches["train"], [caches["a"]], threshold=1.0) == []
    with pytest.raises(LittuneError, match="between -1 and 1"):
        near_duplicates(caches["train"], [caches["a"]], threshold=1.5)
    other = write_cache(tmp_path / "other", np.ones((3, DIM), np.float32), ["x"] * 3, {**SPEC, "kwargs": {"seed": 1}})
    with pytest.raises(LittuneError, match="different image towers") as e:
        near_duplicates(caches["train"], [caches["a"], other], threshold=0.9)
    assert str(caches["train"].directory) in str(e.value) and str(other.directory) in str(e.value)
    assert "\n" not in str(e.value)


def test_cli_writes_the_list_and_prints_the_count(caches, tmp_path, capsys):
    out = tmp_path / "lists" / "dups.tsv"
    rc = main(["dedup", str(caches["train"].directory), "--against", str(caches["a"].directory),
               str(caches["b"].directory), "--threshold", "0.9", "--out", str(out), "-q", "--chunk-rows", "50"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"found {len(PLANTED)} of 200 training images" in printed
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(HEADER) and len(lines) == 1 + len(PLANTED)
    row = lines[1].split("\t")
    assert row[:2] == ["3", "img/0003.png"] and float(row[2]) > 0.99 and row[4] == "a/000"
    assert read_keys(out) == [f"img/{r:04d}.png" for r in sorted(PLANTED)]
    assert not list(out.parent.glob("*.tmp-*"))  # written atomically
    bad = main(["dedup", str(caches["train"].directory), "--against", str(tmp_path / "nope"), "--threshold", "0.9",
                "--out", str(tmp_path / "x.tsv")])
    assert bad == 2 and "not an embedding cache" in capsys.readouterr().err


def _sampled(batches, steps):
    seen = []
    for s in range(steps):
        seen += batches(s)["captions"]  # each training image's only caption is its key
    return seen


def test_training_batches_never_sample_an_excluded_image(caches, tmp_path):
    train = caches["train"]
    lst = write_list(tmp_path / "dups.tsv", near_duplicates(train, [caches["a"], caches["b"]], threshold=0.9))
    batches = CacheBatches(train, 16, 0, 1, seed=3, exclude=lst)
    assert batches.excluded == len(PLANTED)
    steps = 12 * batches.plan.steps_per_epoch
    seen = set(_sampled(batches, steps))
    listed = {f"img/{r:04d}.png" for r in PLANTED}
    assert not seen & listed
    assert len(seen) == 200 - len(PLANTED)  # over 12 epochs every other image was drawn
    np.testing.assert_array_equal(excluded_rows(train, lst), sorted(PLANTED))


def test_an_empty_list_gives_the_batches_of_no_list(caches, tmp_path):
    train = caches["train"]
    empty = write_list(tmp_path / "empty.tsv", [])
    plain, none = CacheBatches(train, 16, 0, 1, seed=5), CacheBatches(train, 16, 0, 1, seed=5, exclude=empty)
    assert none.excluded == 0 and none.rows is None
    for s in (0, 1, 11, 12, 40):
        a, b = plain(s), none(s)
        assert a["captions"] == b["captions"]
        assert np.array_equal(a["image_features"].numpy(), b["image_features"].numpy())


def test_a_list_with_unknown_keys_or_no_header_is_refused(caches, tmp_path):
    lst = tmp_path / "other.tsv"
    lst.write_text("\t".join(HEADER) + "\n0\timg/0000.png\t0.99\tx\ty\n1\tnot/a/key.png\t0.98\tx\ty\n")
    with pytest.raises(LittuneError, match=r"1 of the 2 keys .* not in the cache") as e:
        CacheBatches(caches["train"], 16, 0, 1, seed=0, exclude=lst)
    assert "not/a/key.png" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "plain.txt").write_text("img/0000.png\n")
    with pytest.raises(LittuneError, match="not a `littune dedup` list"):
        CacheBatches(caches["train"], 16, 0, 1, seed=0, exclude=tmp_path / "plain.txt")
    with pytest.raises(LittuneError, match="does not exist"):
        CacheBatches(caches["train"], 16, 0, 1, seed=0, exclude=tmp_path / "missing.tsv")


def test_trainer_excludes_the_list_and_logs_the_count(caches, tmp_path, capsys):
    from littune.config import load_config
    from littune.train.trainer import Trainer

    lst = write_list(tmp_path / "dups.tsv", near_duplicates(caches["train"], [caches["a"], caches["b"]], 0.9))
    base = ["model.image_tower={type: torch, factory: 'littune.towers.tiny:tiny_cnn', "
            "preprocess: {size: 32, resize: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}",
            "model.text_tower={type: transformer, width: 16, depth: 1, heads: 2, context_length: 8, vocab_size: 300}",
            "model.embed_dim=8", "data.batch_size=16", "steps=2", "progress=false", "schedule.warmup_steps=1",
            f"data.cache={caches['train'].directory}", f"run_dir={tmp_path / 'run'}"]
    Trainer(load_config(overrides=base + [f"data.exclude={lst}"])).run()
    assert f"excluded {len(PLANTED)} training images listed in {lst}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.exclude: only training from the embedding cache"):
        load_config(overrides=base + [f"data.exclude={lst}", "model.setting=Uu"]).validate()
