"""littune.cache: embed_source writes what the tower computes; EmbeddingCache reads it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import bad_inputs, captions_for, colour_image, encode, write_csv, write_images, write_tar
from littune.cache import EmbeddingCache, augment_rng, embed_source, summary, write_cache
from littune.data import load_image, open_source
from littune.errors import LittuneError, StaleCacheError
from littune.towers.image import build_image_tower
from littune.towers.tiny import SPEC


@pytest.fixture(scope="module")
def tower():
    return build_image_tower(SPEC).eval()


def _reference(tower, img, rng=None):
    px = tower.preprocess.eval(img) if rng is None else tower.preprocess.train(img, rng)
    with torch.inference_mode():
        return tower(px[None]).numpy()[0]


def _tree(d: Path) -> dict[str, bytes]:
    # .lock names whoever last held the directory (pid, host, time): not the cache's content
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_cache_holds_the_tower_features_captions_and_keys(tmp_path, tower, tiny_model):
    src = open_source(write_csv(tmp_path / "data", n=10))
    cache = embed_source(src, tower, tmp_path / "c32", dtype="float32", views=2, batch_size=4, shard_size=4,
                         workers=0, progress=False)
    assert (len(cache), cache.dim, cache.dtype, cache.views) == (10, 32, "float32", 2)
    assert cache.tower_fingerprint == tower.fingerprint() and cache.source_fingerprint == src.fingerprint()
    assert len(cache.manifest["shards"]) == 3 and cache.manifest["captions"] == src.caption_count()
    model = tiny_model()
    for i, rec in enumerate(src.records()):
        img = load_image(rec.path)
        assert cache.key(i) == rec.key and cache.path(i) == rec.path
        assert cache.captions(i) == rec.captions
        ref = _reference(tower, img)
        np.testing.assert_allclose(cache.features([i])[0], ref, rtol=1e-5, atol=1e-6)
        # what LiTModel.image_features gives for the same pixels
        np.testing.assert_allclose(model.image_features(tower.preprocess.eval(img)[None]).numpy()[0], ref,
                                   rtol=1e-5, atol=1e-6)
        for v in range(2):
            aug = _reference(tower, img, augment_rng(0, rec.key, v))
            np.testing.assert_allclose(cache.features([i], view=v)[0], aug, rtol=1e-5, atol=1e-6)
            assert not np.allclose(aug, ref)  # an augmented view is another view
    idx = np.array([9, 0, 4, 4, 7])
    views = np.array([1, 0, 1, 0, 1])
    got = cache.features(idx, view=views)
    for row, (i, v) in enumerate(zip(idx, views)):
        np.testing.assert_array_equal(got[row], cache.features([i], view=int(v))[0])
    assert got.dtype == np.float32 and got.shape == (5, 32)
    assert cache.features(np.array([], dtype=np.int64)).shape == (0, 32)
    with pytest.raises(IndexError):
        cache.features([10])
    with pytest.raises(IndexError, match="stores 2 augmented"):
        cache.features([0], view=2)
    # float16 (the default) stores the same features, rounded
    c16 = embed_source(src, tower, tmp_path / "c16", batch_size=4, shard_size=4, workers=0, progress=False)
    assert c16.dtype == "float16" and np.load(tmp_path / "c16" / "shards" / "00000.npy").dtype == np.float16
    np.testing.assert_allclose(c16.features(np.arange(10)), cache.features(np.arange(10)), rtol=2e-3, atol=2e-3)
    # opening again reads the same (and verifies checksums)
    again = EmbeddingCache.open(tmp_path / "c32")
    np.testing.assert_array_equal(again.features(np.arange(10), view=1), cache.features(np.arange(10), view=1))


def test_bad_inputs_are_skipped_counted_and_reported(tmp_path, tower):
    """Missing, empty, truncated, not-an-image and huge files are skipped; CMYK, 16-bit and palette embed."""
    csv_path, bad, good = bad_inputs(tmp_path / "bad")
    src = open_source(csv_path)
    cache = embed_source(src, tower, tmp_path / "cache", dtype="float32", batch_size=2, shard_size=3, workers=1,
                         progress=False)
    assert len(cache) == len(good) == 5
    assert [cache.key(i) for i in range(len(cache))] == good  # source order, bad ones left out
    for i, name in enumerate(good):
        ref = _reference(tower, load_image(tmp_path / "bad" / name))
        np.testing.assert_allclose(cache.features([i])[0], ref, rtol=1e-5, atol=1e-6)
        assert cache.captions(i) == [f"a picture called {name}", f"another caption of {name}"]
    report = (tmp_path / "cache" / "skipped.tsv").read_text().splitlines()
    assert report[0] == "where\treason\tdetail" and len(report) == 1 + len(bad)
    rows = {Path(r.split("\t")[0]).name: r.split("\t")[1] for r in report[1:]}
    assert rows == bad
    assert cache.manifest["skipped_by_reason"] == {"missing": 1, "empty file": 1, "not an image": 1,
                                                   "truncated": 1, "too many pixels": 1}
    line = summary(cache)
    assert line.startswith(f"embedded 5 images (32-d float32) into {tmp_path / 'cache'}; skipped 5: 1 missing, ")
    assert "skipped.tsv" in line and "\n" not in line


def test_stale_cache_names_both_fingerprints(tmp_path, tower):
    src = open_source(write_csv(tmp_path, n=3))
    cache = embed_source(src, tower, tmp_path / "c", workers=0, progress=False)
    cache.check(tower_fingerprint=tower.fingerprint(), source_fingerprint=src.fingerprint())  # fine
    other = build_image_tower({**SPEC, "kwargs": {"seed": 1}})
    with pytest.raises(StaleCacheError) as e:
        cache.check(tower_fingerprint=other.fingerprint())
    assert other.fingerprint() in str(e.value) and tower.fingerprint() in str(e.value)
    with pytest.raises(StaleCacheError) as e:
        cache.check(source_fingerprint="csv-0000000000000000")
    assert "csv-0000000000000000" in str(e.value) and src.fingerprint() in str(e.value)


def test_damaged_shards_are_redone_identically(tmp_path, tower):
    src = open_source(write_csv(tmp_path / "data", n=12))
    out = tmp_path / "c"
    embed_source(src, tower, out, views=1, batch_size=3, shard_size=3, workers=0, progress=False)
    before = _tree(out)
    stamp = {p: (out / p).stat().st_mtime_ns for p in before}
    # a torn write of shard 1, a shard 2 whose commit record never landed, leftovers of a killed run
    s1 = out / "shards" / "00001.npy"
    s1.write_bytes(s1.read_bytes()[:-7] + b"garbage")
    (out / "shards" / "00002.json").unlink()
    (out / "shards" / "00003.npy.tmp-12345").write_bytes(b"partial")
    with pytest.raises(LittuneError, match="00001.npy does not match its checksum"):
        EmbeddingCache.open(out)
    cache = embed_source(src, tower, out, views=1, batch_size=3, shard_size=3, workers=0, progress=False)
    assert _tree(out) == before
    assert (out / "shards" / "00000.npy").stat().st_mtime_ns == stamp["shards/00000.npy"]  # not redone
    assert (out / "shards" / "00003.npy").stat().st_mtime_ns == stamp["shards/00003.npy"]
    assert len(cache) == 12
    assert not list(out.rglob("*.tmp-*"))


def test_other_settings_refuse_to_resume_and_no_resume_starts_over(tmp_path, tower):
    src = open_source(write_csv(tmp_path / "data", n=4))
    out = tmp_path / "c"
    embed_source(src, tower, out, dtype="float32", workers=0, progress=False)
    with pytest.raises(LittuneError) as e:
        embed_source(src, tower, out, dtype="float16", workers=0, progress=False)
    assert "dtype 'float32' -> 'float16'" in str(e.value) and "--no-resume" in str(e.value)
    assert EmbeddingCache.open(out).dtype == "float32"  # nothing lost
    (out / "mine.txt").write_text("a user's file")
    cache = embed_source(src, tower, out, dtype="float16", resume=False, workers=0, progress=False)
    assert cache.dtype == "float16" and (out / "mine.txt").exists()
    with pytest.raises(LittuneError, match="not an embedding cache"):
        EmbeddingCache.open(tmp_path / "data")
    # a second writer on the same directory is refused while the first holds it
    from littune.cache import _lock

    held = _lock(out)
    try:
        with pytest.raises(LittuneError, match="being written by another"):
            embed_source(src, tower, out, dtype="float16", workers=0, progress=False)
    finally:
        held.close()
    embed_source(src, tower, out, dtype="float16", workers=0, progress=False)


def test_webdataset_through_worker_processes(tmp_path, tower):
    members = []
    for i in range(5):
        members += [(f"k{i}.png", encode(colour_image(i), "PNG")), (f"k{i}.txt", "\n".join(captions_for(i)).encode())]
    write_tar(tmp_path / "s-0.tar", members[:6])
    write_tar(tmp_path / "s-1.tar", members[6:])
    cache = embed_source(str(tmp_path / "s-{0..1}.tar"), tower, tmp_path / "c", dtype="float32", workers=2,
                         shard_size=2, progress=False)
    assert [cache.key(i) for i in range(5)] == [f"k{i}" for i in range(5)]
    for i in range(5):
        assert cache.captions(i) == captions_for(i)
        np.testing.assert_allclose(cache.features([i])[0], _reference(tower, colour_image(i)), rtol=1e-5, atol=1e-6)
    assert cache.path(3).endswith("s-1.tar:k3")


def test_reader_memory_stays_bounded(tmp_path, tower):
    src = open_source(write_csv(tmp_path / "data", n=10))
    embed_source(src, tower, tmp_path / "c", shard_size=2, workers=0, progress=False)
    small = EmbeddingCache.open(tmp_path / "c", max_open=2)
    full = EmbeddingCache.open(tmp_path / "c", verify=False)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.integers(0, 10, size=4)
        np.testing.assert_array_equal(small.features(idx), full.features(idx))
        assert len(small._open) <= 2
    # Rows are read with pread, never through a memory map (mapped pages would count in the RSS).
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / "c") not in maps.read_text()
    # Evicted shard files are closed.
    small.features([0])
    first = small._open[0]
    small.features([9, 5])
    assert 0 not in small._open and first.fd == -1


def test_write_cache_from_precomputed_features(tmp_path, tower):
    from littune.cache import write_cache

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((11, 32)).astype(np.float32)
    caps = [[f"image {i}", f"picture {i}"] if i % 3 else f"only {i}" for i in range(11)]
    c = write_cache(tmp_path / "w", feats, caps, SPEC, dtype="float32", shard_size=4)
    again = EmbeddingCache.open(tmp_path / "w")  # checksums hold
    c.check(tower_fingerprint=tower.fingerprint())  # a trainer configured with SPEC accepts it
    assert (len(again), again.dim, again.views, len(again.manifest["shards"])) == (11, 32, 0, 3)
    np.testing.assert_array_equal(again.features(np.arange(11)), feats)
    np.testing.assert_array_equal(again.features([10, 3, 3, 0]), feats[[10, 3, 3, 0]])
    assert again.captions(1) == ["image 1", "picture 1"] and again.captions(3) == ["only 3"]
    assert again.key(4) == "00000004" and again.source_index(5) == 5
    assert list(again.iter_captions(chunk=3)) == [x for cs in caps for x in ([cs] if isinstance(cs, str) else cs)]
    assert again.sample_captions([1, 1, 3, 10], [0, 3, 7, 1]) == ["image 1", "picture 1", "only 3", "picture 10"]
    import pickle

    copy = pickle.loads(pickle.dumps(again))  # e.g. to a spawned worker: opens its own files
    np.testing.assert_array_equal(copy.features([7, 2]), feats[[7, 2]])
    assert copy.captions(2) == again.captions(2)
    # augmented views and float16
    views = rng.standard_normal((5, 3, 32)).astype(np.float32)
    v = write_cache(tmp_path / "v", views, [["x"]] * 5, tower, shard_size=2)
    assert (v.views, v.dtype) == (2, "float16")
    np.testing.assert_allclose(v.features([4, 0, 1, 2], view=[1, 0, 1, 0]),
                               views[[4, 0, 1, 2], [2, 1, 2, 1]], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(v.features(np.arange(5)), views[:, 0], rtol=1e-3, atol=1e-3)
    with pytest.raises(LittuneError, match="64-d but the tower"):
        write_cache(tmp_path / "bad", np.zeros((2, 64), np.float32), [["a"], ["b"]], tower)
    with pytest.raises(LittuneError, match="caption entries"):
        write_cache(tmp_path / "bad", feats, caps[:3], tower)
    with pytest.raises(LittuneError, match="exceed the float16 range.*float32"):
        write_cache(tmp_path / "big", feats * 1e5, caps, tower)  # silently inf in float16: refused


def test_empty_source_and_bad_arguments(tmp_path, tower):
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    with pytest.raises(LittuneError, match="holds no images"):
        embed_source(empty, tower, tmp_path / "c", progress=False)
    src = write_csv(tmp_path / "d", n=2)
    with pytest.raises(LittuneError, match="dtype"):
        embed_source(src, tower, tmp_path / "c", dtype="int8", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LittuneError, match="is a file"):
        embed_source(src, tower, tmp_path / "file", workers=0, progress=False)


def _half_captioned(root: Path) -> Path:
    """Six images; im0001 has an empty caption cell, im0004 only a row with no caption column value."""
    names = write_images(root / "img", 6)
    rows = ["image,caption"]
    for i, nm in enumerate(names):
        rows.append(f"img/{nm}," if i in (1, 4) else f"img/{nm},caption of {i}")
    rows.append("img/im0004.png,   ")  # blank after stripping: still no caption
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def test_images_without_a_caption_are_cached_reported_and_never_trained_on(tmp_path, tower):
    from littune.train.batches import CacheBatches

    src = open_source(_half_captioned(tmp_path / "data"))
    cache = embed_source(src, tower, tmp_path / "c", shard_size=4, batch_size=2, workers=0, progress=False)
    # kept (an index or an eval can use their features), counted, reported, not trainable
    assert len(cache) == 6 and cache.manifest["no_caption"] == 2
    np.testing.assert_array_equal(cache.trainable(), [0, 2, 3, 5])
    rows = [r.split("\t") for r in (tmp_path / "c" / "skipped.tsv").read_text().splitlines()[1:]]
    assert [(Path(w).name, reason) for w, reason, _ in rows] == [("im0001.png", "no-caption"),
                                                                  ("im0004.png", "no-caption")]
    assert cache.skipped() == []  # skipped() lists images left out of the cache; these are in it
    line = summary(cache)
    assert line == (f"embedded 6 images (32-d float16) into {tmp_path / 'c'}; 2 without a caption "
                    f"(not trained on, see {tmp_path / 'c' / 'skipped.tsv'})")
    # training batches draw only captioned images, never the empty string
    batches = CacheBatches(cache, 4, 0, 1, seed=0)
    captioned = {i: f"caption of {i}" for i in (0, 2, 3, 5)}
    feats = {i: cache.features([i])[0] for i in captioned}
    for step in range(6):
        b = batches(step)
        assert all(c in captioned.values() for c in b["captions"])
        for caption, f in zip(b["captions"], b["image_features"].numpy()):
            np.testing.assert_array_equal(f, feats[int(caption.rsplit(" ", 1)[1])])


def test_prefetched_batches_are_the_plain_loops_and_an_error_reaches_the_step_that_wants_it(tmp_path, tower):
    from littune.train.batches import CacheBatches, Prefetched

    cache = embed_source(open_source(_half_captioned(tmp_path / "data")), tower, tmp_path / "c", workers=0,
                         progress=False)
    batches = CacheBatches(cache, 4, 0, 1, seed=0, language_share={})
    got = list(Prefetched(batches, range(3, 9)))
    want = [batches(s) for s in range(3, 9)]
    assert len(got) == 6 and [g["captions"] for g in got] == [w["captions"] for w in want]
    assert all(torch.equal(g["image_features"], w["image_features"]) for g, w in zip(got, want))

    def make(step):
        if step == 2:
            raise LittuneError("step 2 cannot be made")
        return step

    it = Prefetched(make, range(5))
    assert [next(it), next(it)] == [0, 1]  # step 2 fails in the thread while step 1 is used
    with pytest.raises(LittuneError, match="step 2"):
        next(it)


def test_a_cache_without_any_caption_is_refused_for_training(tmp_path, tower):
    from littune.train.batches import CacheBatches

    names = write_images(tmp_path / "img", 3)
    (tmp_path / "list.csv").write_text("image,caption\n" + "".join(f"img/{n},\n" for n in names))
    cache = embed_source(tmp_path / "list.csv", tower, tmp_path / "c", workers=0, progress=False)
    assert len(cache) == 3 and len(cache.trainable()) == 0
    with pytest.raises(LittuneError, match=r"none of the 3 images .* has a caption") as e:
        CacheBatches(cache, 2, 0, 1, seed=0)
    assert "\n" not in str(e.value)


def test_write_cache_rows_without_captions_are_not_trainable(tmp_path, tower):
    feats = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    c = write_cache(tmp_path / "w", feats, [["a"], [], "", ["b", ""], "c"], tower, dtype="float32")
    np.testing.assert_array_equal(c.trainable(), [0, 3, 4])
    assert c.captions(3) == ["b"] and c.manifest["no_caption"] == 2
    assert c.sample_captions([0, 3, 4], [5, 5, 5]) == ["a", "b", "c"]


def test_on_the_fly_batches_skip_records_without_captions(tmp_path, tower):
    from littune.train.batches import OnTheFlyBatches

    src = open_source(_half_captioned(tmp_path / "data"))
    ds = OnTheFlyBatches(src.records(), tower.preprocess, 4, 0, 1, seed=0)
    for step in range(6):
        assert all(c.startswith("caption of ") for c in ds[step]["captions"])
    bare = [r for r in src.records() if not r.captions]
    with pytest.raises(LittuneError, match="none of the 2 images has a caption"):
        OnTheFlyBatches(bare, tower.preprocess, 2, 0, 1, seed=0)


def _as_made_under_the_old_rule(out: Path) -> str:
    """Rewrite a cache's manifest and plan as littune wrote them before fingerprint scheme 2: no
    ``fingerprint_scheme``, a torch: tower named without its pooling and factory arguments."""
    import json

    old = None
    for name in ("manifest.json", "plan.json"):
        data = json.loads((out / name).read_text())
        for d in (data, data.get("plan", {})):
            d.pop("fingerprint_scheme", None)
            if "tower_fingerprint" in d:
                name_part, rest = d["tower_fingerprint"].split("|", 1)
                old = d["tower_fingerprint"] = f"{name_part.split('#')[0]}|{rest}"
        (out / name).write_text(json.dumps(data))
    return old


def test_a_cache_made_under_the_old_fingerprint_rule_is_stale_once_saying_why(tmp_path, tower, capsys):
    """Before scheme 2 an hf:/torch: fingerprint left the pooling out: such a cache may hold another
    pooling's features. It is refused (even for a model that recorded the same old fingerprint), saying
    why; --allow-stale-cache uses it with a warning; re-embedding makes a cache that is accepted."""
    from littune.cache.stale import old_fingerprint_rule

    src = open_source(write_csv(tmp_path / "data", n=3))
    out = tmp_path / "c"
    embed_source(src, tower, out, workers=0, progress=False)
    assert EmbeddingCache.open(out).manifest["fingerprint_scheme"] == 2
    old = _as_made_under_the_old_rule(out)
    cache = EmbeddingCache.open(out)
    for expected in (tower.fingerprint(), old):
        with pytest.raises(StaleCacheError) as e:
            cache.check(tower_fingerprint=expected, allow_stale=False)
        assert "old fingerprint rule" in str(e.value) and "--allow-stale-cache" in str(e.value)
        assert "\n" not in str(e.value)
    cache.check(tower_fingerprint=tower.fingerprint(), allow_stale=True)
    err = capsys.readouterr().err
    assert err.startswith("littune: warning: ") and "old fingerprint rule" in err and err.count("\n") == 1
    cache.check(source_fingerprint=src.fingerprint())  # the source alone is not in question
    with pytest.raises(LittuneError, match="old fingerprint rule.*--no-resume"):
        embed_source(src, tower, out, workers=0, progress=False)
    embed_source(src, tower, out, workers=0, progress=False, resume=False).check(tower_fingerprint=tower.fingerprint())
    # a model saved under the old rule: its fingerprint is not this cache's, and the message says why
    with pytest.raises(StaleCacheError, match="a model saved by an earlier littune"):
        EmbeddingCache.open(out).check(tower_fingerprint=old)
    # other towers' fingerprints did not change: their caches are not stale
    assert not old_fingerprint_rule("efficientnet-lite0|w=0123|p=ab", 1)
    assert not old_fingerprint_rule("onnx:tower.onnx|w=0123|p=ab", 1)
    assert old_fingerprint_rule("hf:vit|w=0123|p=ab") and not old_fingerprint_rule("hf:vit#cls|w=0123|p=ab")
