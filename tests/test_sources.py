"""littune.data.sources: one reader per format, each grouping multi-caption images into one record."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from data_fixtures import captions_for, colour_image, encode, write_csv, write_images, write_tar
from littune.data import Record, open_source
from littune.data.sources import expand_braces
from littune.errors import ConfigError, LittuneError


def _same_pixels(rec: Record, i: int) -> bool:
    return np.array_equal(np.asarray(rec.open()), np.asarray(colour_image(i)))


def test_csv_groups_rows_by_image(tmp_path):
    path = write_csv(tmp_path, n=6)
    src = open_source(path)
    assert src.type == "csv" and len(src) == 6
    recs = src.records()
    # every image once, first-appearance order, all of its captions (several rows each)
    assert sorted(r.key for r in recs) == [f"img/im{i:04d}.png" for i in range(6)]
    for r in recs:
        i = int(r.key[6:10])
        assert sorted(r.captions) == sorted(captions_for(i))
        assert r.path == str(tmp_path / r.key)  # relative to the CSV's folder
        assert _same_pixels(r, i)
    assert any(len(r.captions) == 3 for r in recs)
    assert list(src) == recs
    assert src.caption_count() == sum(len(captions_for(i)) for i in range(6))


def test_tsv_custom_columns_separator_and_root(tmp_path):
    write_images(tmp_path / "pics", 2)
    (tmp_path / "meta").mkdir()
    tsv = tmp_path / "meta" / "list.tsv"
    tsv.write_text("id\tfile\tdescriptions\n1\tim0000.png\ta cat | a small cat|\n2\tim0001.png\ta dog\n"
                   "3\t./im0000.png\ta cat\n\n4\t\tno image here\n")
    with pytest.raises(ConfigError) as e:
        open_source(tsv).records()
    assert "cannot tell which column holds the caption" in str(e.value) and "descriptions" in str(e.value)
    src = open_source(tsv, image_column="file", caption_column="descriptions", caption_sep="|",
                      image_root=str(tmp_path / "pics"))
    recs = src.records()
    assert [r.key for r in recs] == ["im0000.png", "im0001.png"]
    assert recs[0].captions == ["a cat", "a small cat"]  # split, stripped, duplicates and blanks dropped
    assert recs[1].captions == ["a dog"]
    assert _same_pixels(recs[0], 0)
    assert src.problems == [(f"{tsv}:6", "row without an image")]
    with pytest.raises(ConfigError, match="no caption column 'nope'"):
        open_source(tsv, image_column="file", caption_column="nope").records()
    unlabeled = open_source(tsv, image_column="file", caption_column=None)
    assert [r.captions for r in unlabeled.records()] == [[], []]


def test_jsonl_strings_and_lists(tmp_path):
    write_images(tmp_path / "img", 3)
    lines = [{"image": "img/im0000.png", "caption": "one"},
             {"image": "img/im0001.png", "captions": ["two", "deux", "zwei"]},
             {"image": "img/im0000.png", "caption": ["uno", "one"]},
             {"image": "img/im0002.png", "caption": "три 🐈"}]
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    src = open_source(p, caption_column="caption")
    recs = src.records()
    assert [r.key for r in recs] == ["img/im0000.png", "img/im0001.png", "img/im0002.png"]
    assert recs[0].captions == ["one", "uno"]
    assert recs[1].captions == []  # no 'caption' key on that line
    assert recs[2].captions == ["три 🐈"]
    src2 = open_source(p, caption_column="captions")
    assert src2.records()[1].captions == ["two", "deux", "zwei"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n{"image": oops}\n')
    with pytest.raises(LittuneError, match=r"bad.jsonl:2: not valid JSON"):
        open_source(bad).records()


def _wds_members(start: int, n: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(start, start + n):
        key = f"sample{i:04d}"
        img = colour_image(i)
        if i % 3 == 0:
            members.append((f"{key}.jpg", encode(img, "JPEG", quality=95)))
            members.append((f"{key}.txt", "\n".join(captions_for(i)).encode()))
        elif i % 3 == 1:
            members.append((f"{key}.json", json.dumps({"captions": captions_for(i), "id": i}).encode()))
            members.append((f"{key}.png", encode(img, "PNG")))
        else:
            members.append((f"{key}.webp", encode(img, "WEBP", lossless=True)))
            members.append((f"{key}.json", json.dumps({"caption": captions_for(i)[0]}).encode()))
    return members


def test_webdataset_brace_pattern(tmp_path):
    write_tar(tmp_path / "shard-000.tar", _wds_members(0, 4))
    extra = [("orphan.txt", b"a caption without image"), ("nested/dir/x.png", encode(colour_image(99), "PNG")),
             ("nested/dir/x.txt", b"nested")]
    write_tar(tmp_path / "shard-001.tar", _wds_members(4, 3) + extra)
    pattern = str(tmp_path / "shard-{000..001}.tar")
    assert expand_braces(pattern) == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    src = open_source(pattern)
    assert src.type == "webdataset" and len(src) == 8
    recs = src.records()
    assert [r.key for r in recs][:7] == [f"sample{i:04d}" for i in range(7)]
    for r in recs[:7]:
        i = int(r.key[6:])
        want = captions_for(i) if i % 3 != 2 else captions_for(i)[:1]
        assert r.captions == want
        assert r.path is None and r.shard is not None and r.size > 0
        img = np.asarray(r.open(), dtype=int)
        err = np.abs(img - np.asarray(colour_image(i), dtype=int)).mean()
        assert err < (20 if i % 3 == 0 else 0.01)  # JPEG lossy, PNG/WebP lossless
    assert recs[7].key == "nested/dir/x" and recs[7].captions == ["nested"]
    assert src.problems == [(f"{tmp_path / 'shard-001.tar'}:orphan", "captions without an image")]
    # the same shards as a folder, a glob and a list give the same records
    for spec in (str(tmp_path), str(tmp_path / "shard-*.tar")):
        assert [r.key for r in open_source(spec).records()] == [r.key for r in recs]
    with pytest.raises(LittuneError, match="1 of 3 shards"):
        open_source(str(tmp_path / "shard-{000..002}.tar"))


def test_webdataset_caption_languages(tmp_path):
    png = encode(colour_image(0), "PNG")
    write_tar(tmp_path / "s.tar", [
        ("a.png", png), ("a.json", json.dumps({"captions": ["a cat", "eine Katze", "a cat"], "langs": ["en", "de", "fr"]}).encode()),
        ("b.png", png), ("b.json", json.dumps({"caption": "un chat", "lang": "fr"}).encode()),
        ("c.png", png), ("c.txt", b"plain"), ("c.json", json.dumps({"captions": ["x"], "language": "ja"}).encode()),
        ("d.png", png), ("d.txt", b"no language here"),
        ("e.png", png), ("e.json", json.dumps({"captions": ["y", "z"], "langs": ["en"]}).encode()),  # not parallel
    ])
    src = open_source(str(tmp_path / "s.tar"))
    got = {r.key: (r.captions, r.langs) for r in src.records()}
    assert got["a"] == (["a cat", "eine Katze"], ["en", "de"])  # a repeat keeps its first language
    assert got["b"] == (["un chat"], ["fr"])
    assert got["c"] == (["plain", "x"], ["", "ja"])  # a txt member names no language
    assert got["d"] == (["no language here"], [])
    assert got["e"] == (["y", "z"], []) and "as long as the caption list" in src.problems[0][1]
    plain = open_source(str(tmp_path / "s.tar"), lang_column="nope")  # a key no member has: no languages
    assert all(r.langs == [] for r in plain.records()) and plain.fingerprint() != src.fingerprint()


def test_webdataset_gzip_and_duplicate_keys(tmp_path):
    write_tar(tmp_path / "a.tar.gz", _wds_members(0, 2), mode="w:gz")
    write_tar(tmp_path / "b.tar", _wds_members(0, 1))  # sample0000 again: another image
    src = open_source(str(tmp_path / "{a.tar.gz,b.tar}"))
    keys = [r.key for r in src.records()]
    assert keys == ["sample0000", "sample0001", "b.tar/sample0000"]
    r0 = src.records()[0]
    assert r0.data is not None and r0.shard is None  # compressed: bytes read into memory
    assert r0.open().size == (48, 36)


def test_folder_with_sidecars(tmp_path):
    root = tmp_path / "photos"
    write_images(root / "b", 2, start=0, ext="jpg")
    write_images(root / "a", 1, start=2)
    (root / "b" / "im0000.txt").write_text("first caption\nsecond caption\n\n")
    (root / "a" / "im0002.png.txt").write_text("in folder a")
    (root / ".hidden").mkdir()
    write_images(root / ".hidden", 1, start=5)
    (root / "notes.md").write_text("not an image")
    os.symlink(root / "gone.png", root / "zz_dangling.png")
    src = open_source(root)
    assert src.type == "folder"
    recs = src.records()
    assert [r.key for r in recs] == ["a/im0002.png", "b/im0000.jpg", "b/im0001.jpg", "zz_dangling.png"]
    by_key = {r.key: r for r in recs}
    assert by_key["b/im0000.jpg"].captions == ["first caption", "second caption"]
    assert by_key["a/im0002.png"].captions == ["in folder a"]
    assert by_key["b/im0001.jpg"].captions == []
    assert _same_pixels(by_key["a/im0002.png"], 2)


def test_coco_captions_layout(tmp_path):
    write_images(tmp_path / "val2017", 3)
    (tmp_path / "annotations").mkdir()
    coco = {
        "images": [{"id": 10 + i, "file_name": f"im{i:04d}.png"} for i in range(3)],
        "annotations": [{"id": k, "image_id": 10 + i, "caption": c}
                        for k, (i, c) in enumerate((i, c) for i in range(3) for c in captions_for(i))]
        + [{"id": 99, "image_id": 77, "caption": "no such image"}],
    }
    p = tmp_path / "annotations" / "captions_val2017.json"
    p.write_text(json.dumps(coco))
    src = open_source(p)
    assert src.type == "coco" and len(src) == 3
    for i, r in enumerate(src.records()):
        assert r.key == f"im{i:04d}.png" and r.captions == captions_for(i)
        assert r.path == str(tmp_path / "val2017" / r.key)  # found ../val2017 by itself
        assert _same_pixels(r, i)
    assert src.problems == [(f"{p}:image_id=77", "captions for an image_id not in 'images'")]
    notcoco = tmp_path / "other.json"
    notcoco.write_text('{"foo": 1}')
    with pytest.raises(LittuneError, match="not a COCO captions file"):
        open_source(notcoco).records()


def test_fingerprint_is_stable_and_follows_content(tmp_path):
    path = write_csv(tmp_path / "one", n=4)
    fp = open_source(path).fingerprint()
    assert fp.startswith("csv-") and fp == open_source(path).fingerprint()
    # a copy of the dataset somewhere else is the same dataset
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    assert open_source(tmp_path / "two" / "pairs.csv").fingerprint() == fp
    # options that change the records change it
    assert open_source(path, caption_sep=" ").fingerprint() != fp
    with open(path, "a") as f:
        f.write("img/im0000.png,one more caption\n")
    assert open_source(path).fingerprint() != fp
    folder = tmp_path / "f"
    write_images(folder, 2)
    ffp = open_source(folder).fingerprint()
    (folder / "im0000.txt").write_text("now captioned")
    assert open_source(folder).fingerprint() != ffp


def test_open_source_detection_and_errors(tmp_path):
    path = write_csv(tmp_path, n=2)
    txt = tmp_path / "list.txt"
    txt.write_text(path.read_text())
    with pytest.raises(LittuneError, match="cannot tell the format"):
        open_source(txt)
    assert open_source(f"csv:{txt}").type == "csv"
    assert len(open_source({"type": "csv", "path": str(txt), "image_column": "image"})) == 2
    with pytest.raises(LittuneError, match="source not found"):
        open_source(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="unknown source option"):
        open_source(path, colour="red")
    with pytest.raises(ConfigError, match="unknown source type"):
        open_source({"type": "parquet", "path": str(path)})


def _grow(path) -> None:
    """Change a file's size (and so its stamp) without renaming it."""
    with open(path, "ab") as f:
        f.write(b"\0")


def test_fingerprint_follows_the_image_files_of_every_kind(tmp_path):
    """Bug: the same index pointed at other images (image_root, a changed file) kept its fingerprint."""
    write_images(tmp_path / "a", 3)
    write_images(tmp_path / "b", 3, start=3)  # the same names, other pictures
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,caption\nim0000.png,one\nim0001.png,two\nim0002.png,three\n")
    fp_a = open_source(csv_path, image_root=str(tmp_path / "a")).fingerprint()
    assert open_source(csv_path, image_root=str(tmp_path / "b")).fingerprint() != fp_a
    # the same files somewhere else (a copy that keeps sizes and mtimes) are the same images
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")
    assert open_source(csv_path, image_root=str(tmp_path / "a_copy")).fingerprint() == fp_a
    _grow(tmp_path / "a" / "im0001.png")
    assert open_source(csv_path, image_root=str(tmp_path / "a")).fingerprint() != fp_a

    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"im{i:04d}.png", "caption": f"c{i}"}) + "\n" for i in range(3)))
    fp_j = open_source(jsonl, image_root=str(tmp_path / "a_copy")).fingerprint()
    assert open_source(jsonl, image_root=str(tmp_path / "b")).fingerprint() != fp_j

    coco = {"images": [{"id": i, "file_name": f"im{i:04d}.png"} for i in range(3)],
            "annotations": [{"image_id": i, "caption": f"c{i}"} for i in range(3)]}
    coco_path = tmp_path / "captions_x.json"
    coco_path.write_text(json.dumps(coco))
    fp_c = open_source(coco_path, image_root=str(tmp_path / "a_copy")).fingerprint()
    assert open_source(coco_path, image_root=str(tmp_path / "b")).fingerprint() != fp_c

    (tmp_path / "a_copy" / "im0000.txt").write_text("a caption")
    fp_f = open_source(tmp_path / "a_copy").fingerprint()
    _grow(tmp_path / "a_copy" / "im0002.png")  # no caption, no key changes: only the file
    assert open_source(tmp_path / "a_copy").fingerprint() != fp_f


def test_fingerprint_follows_tar_shards(tmp_path):
    (tmp_path / "s").mkdir()
    shard = write_tar(tmp_path / "s" / "shard-000.tar", _wds_members(0, 3))
    fp = open_source(shard).fingerprint()
    shutil.copytree(tmp_path / "s", tmp_path / "s2")
    assert open_source(tmp_path / "s2" / "shard-000.tar").fingerprint() == fp
    # rewrite the shard: other bytes of the same length under the same member names, same tar size
    members = [(n, bytes(reversed(d)) if n.endswith(".webp") else d) for n, d in _wds_members(0, 3)]
    size = shard.stat().st_size
    write_tar(shard, members)
    os.utime(shard, ns=(1, 1))
    assert shard.stat().st_size == size
    assert open_source(shard).fingerprint() != fp


# -- names that are not UTF-8 ------------------------------------------------------------------------
BAD_NAME = os.fsencode("im") + b"\xff\xfe.png"  # bytes a file system allows and UTF-8 does not
BAD_SHOWN = "im\\xff\\xfe.png"  # how reports show it: the bytes as \x escapes


def test_a_folder_file_name_that_is_not_utf8_is_skipped_and_reported_with_escapes(tmp_path):
    root = tmp_path / "photos"
    write_images(root, 3)
    with open(os.path.join(os.fsencode(root), BAD_NAME), "wb") as f:
        f.write(encode(colour_image(7), "PNG"))
    src = open_source(root)
    assert [r.key for r in src.records()] == ["im0000.png", "im0001.png", "im0002.png"]
    assert src.problems == [(f"{root}/{BAD_SHOWN}", "file name is not UTF-8 (its bytes shown as \\x escapes); "
                                                    "rename the file to include it")]
    assert src.bad_names == [f"{root}/{BAD_SHOWN}"]
    assert src.fingerprint().startswith("folder-")  # was: UnicodeEncodeError, surrogates not allowed


def test_tar_members_and_json_strings_that_are_not_utf8_are_skipped(tmp_path):
    members = _wds_members(0, 2) + [(BAD_NAME.decode("utf-8", "surrogateescape"), encode(colour_image(9), "PNG"))]
    write_tar(tmp_path / "shard.tar", members)
    src = open_source(tmp_path / "shard.tar")
    assert [r.key for r in src.records()] == ["sample0000", "sample0001"]
    assert src.bad_names == [f"{tmp_path / 'shard.tar'}:im\\xff\\xfe"] and src.fingerprint()
    write_images(tmp_path / "img", 2)
    lines = [{"image": "img/im0000.png", "caption": ["fine", "lone \ud800 surrogate"]},
             {"image": "img/\udcffim0001.png", "caption": "x"}, {"image": "img/im0001.png", "caption": "ok"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    src = open_source(tmp_path / "pairs.jsonl")
    assert [(r.key, r.captions) for r in src.records()] == [("img/im0000.png", ["fine"]), ("img/im0001.png", ["ok"])]
    assert src.bad_names == [f"{tmp_path / 'img'}/\\xffim0001.png"]
    assert (f"{tmp_path / 'img' / 'im0000.png'}", "a caption is not valid Unicode text ('lone \\ud800 surrogate'); "
            "caption dropped") in src.problems
    assert src.fingerprint()
