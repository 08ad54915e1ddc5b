"""The inference API (encode, classify, load) and the evaluation datasets, on a tiny model.

The known-answer test sets the projection heads so that class k's images and prompts both map to
the k-th basis vector: zero-shot accuracy must then be exactly 1.0 through the whole pipeline
(class folder, classnames.txt order, template ensembling, metrics), and 0.0 when the class names
are given in a deranged order.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import littune
from littune.errors import LittuneError
from littune.inference.embeddings import cached_image_embedding_batches, cached_image_embeddings, image_embeddings
from littune.eval.sets import class_folder, label_csv, open_labeled, open_retrieval
from littune.eval.zeroshot import evaluate_zeroshot, zeroshot_classifier

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 170)}


pytestmark = pytest.mark.usefixtures("one_thread")


def solid(rgb, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def make_class_folder(root: Path, per_class: int = 3) -> Path:
    """root/c<k>_<colour>/<i>.png solid-colour images of different sizes and formats."""
    for k, (name, rgb) in enumerate(COLOURS.items()):
        d = root / f"c{k}_{name}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            solid(rgb, (36 + 8 * i, 32 + 4 * i)).save(d / f"{i}.{'png' if i % 2 == 0 else 'jpg'}", quality=100)
    return root


def test_encode_images_paths_pil_and_batches_agree(tiny_model, tmp_path):
    model = tiny_model()
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    for i, p in enumerate(paths):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(p)
    a = model.encode_images([str(p) for p in paths])
    assert a.shape == (5, 16) and a.dtype == torch.float32
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-5)
    b = model.encode_images([Image.open(p) for p in paths], batch_size=2)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(model.encode_images(paths[0]), a[:1], atol=1e-5)  # a single path
    # the same numbers as the model's own forward on preprocessed pixels
    pix = torch.stack([model.preprocess.eval(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pix), a, atol=1e-5)


def test_encode_texts_and_mode_is_restored(tiny_model):
    model = tiny_model()
    model.train()
    t = model.encode_texts(["a red apple", "a cat on a mat"])
    assert model.training
    assert t.shape == (2, 16) and torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(model.encode_texts("a red apple"), t[:1], atol=1e-5)
    toks = model.tokenize(["a cat on a mat"])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_text(**toks), t[1:], atol=1e-5)
    with pytest.raises(LittuneError, match="strings"):
        model.encode_texts([1, 2])


def test_encode_texts_dedups_sorts_and_pads_to_longest_without_changing_embeddings(tiny_model):
    """Inference encodes each distinct text once, shortest first, padded to its batch's longest: the
    rows (in the caller's order, repeats included) equal the full-context padded forward of each text."""
    model = tiny_model().eval()
    texts = ["a very long caption about a red apple on a wooden table", "cat", "a cat on a mat", "cat",
             "", "a red apple", "a very long caption about a red apple on a wooden table", "dog"]
    got = model.encode_texts(texts, batch_size=3)
    toks = model.tokenize(texts)  # padded to the context length, as in training
    assert toks["input_ids"].shape[1] == model.text_tower.context_length
    short = model.tokenize(["cat", "a cat on a mat"], padding="longest")["input_ids"]
    assert short.shape[1] < toks["input_ids"].shape[1]
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(**toks).float(), dim=-1)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got[1], got[3]) and torch.equal(got[0], got[6])


def test_encode_texts_batches_texts_by_their_token_counts_across_chunks(tiny_model, monkeypatch):
    """Texts are tokenized a chunk at a time and batched by token count, not characters (a script
    may take several tokens a character): each batch is cut to its own longest text, and the rows
    still equal each text's full-context forward, in the caller's order, across chunk borders."""
    model = tiny_model().eval()
    monkeypatch.setattr("littune.inference.embeddings.TOKENIZE_CHUNK", 5)
    texts = ["猫猫猫猫", "a red apple on a table", "cat", "ünïcödé ünïcödé", "dog", "🦄🦄", "a cat", "mat", "x"]
    shapes, encode = [], model.encode_text

    def spy(input_ids, attention_mask):
        shapes.append((input_ids.shape[1], int(attention_mask.sum(1).max()), int(attention_mask.sum(1).min())))
        return encode(input_ids, attention_mask)

    monkeypatch.setattr(model, "encode_text", spy)
    got = model.encode_texts(texts, batch_size=2)
    assert len(shapes) == 5  # 9 distinct texts: chunks of 5 and 4, batches of 2: 3 + 2
    assert all(width == longest for width, longest, _ in shapes)
    monkeypatch.setattr(model, "encode_text", encode)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_text(**model.tokenize(texts)).float(), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)


def test_text_embeddings_with_a_memo_encode_a_text_shared_by_two_calls_once(tiny_model, monkeypatch):
    """Validation and the per-language evaluation pass one memo to every call: a text already
    encoded is not encoded again, and the rows equal those of calls without it."""
    from littune.inference.embeddings import text_embeddings

    model = tiny_model().eval()
    first, second = ["a red apple", "cat", "a cat on a mat"], ["cat", "dog", "a red apple", "dog"]
    want = [text_embeddings(model, first), text_embeddings(model, second)]
    encoded, encode = [], model.encode_text

    def spy(input_ids, attention_mask):
        encoded.append(input_ids.shape[0])
        return encode(input_ids, attention_mask)

    monkeypatch.setattr(model, "encode_text", spy)
    memo: dict = {}
    got = [text_embeddings(model, first, memo=memo), text_embeddings(model, second, memo=memo)]
    assert sum(encoded) == 4 and set(memo) == set(first) | set(second)  # "dog" is the only new text
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert text_embeddings(model, [], memo=memo).shape == (0, want[0].shape[1])


def test_classify_probabilities(tiny_model, tmp_path):
    model = tiny_model()
    imgs = [solid(rgb) for rgb in COLOURS.values()]
    labels = ["red", "green", "blue"]
    p = model.classify(imgs, labels, templates=["a {} square", "{}"])
    assert p.shape == (5, 3)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-5)
    w = zeroshot_classifier(model, labels, ["a {} square", "{}"])
    ref = torch.softmax(model.logit_scale.exp() * model.encode_images(imgs) @ w.T, dim=1)
    assert torch.allclose(p, ref, atol=1e-5)
    multi = model.classify(imgs, labels, templates="none", multi_label=True)
    assert ((multi >= 0) & (multi <= 1)).all()
    with pytest.raises(LittuneError, match="label list is empty"):
        model.classify(imgs, [])
    with pytest.raises(LittuneError, match="unknown template set"):
        model.classify(imgs, labels, templates="nope")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(LittuneError, match=r"broken.png.*not an image"):
        model.classify([imgs[0], str(bad)], labels)
    with pytest.raises(LittuneError, match=r"missing.png.*missing"):
        model.encode_images([str(tmp_path / "missing.png")])


def test_load_round_trip(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    loaded = littune.load(str(tmp_path / "m"))
    img = [solid((10, 200, 30))]
    assert torch.allclose(loaded.encode_images(img), model.encode_images(img), atol=1e-6)
    assert torch.allclose(loaded.encode_texts(["a cat"]), model.encode_texts(["a cat"]), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        littune.load(str(tmp_path))


def _align_heads(model, dataset, templates):
    """Set both heads so that class k's images and filled prompts map exactly to basis vector k."""
    c = len(dataset.classnames)
    first = [dataset.labels.index(k) for k in range(c)]
    pix = torch.stack([model.preprocess.eval(dataset.records[i].open()) for i in first])
    with torch.no_grad():
        feats = model.image_features(pix).double()  # (C, 32)
        texts = [t.replace("{}", n) for n in dataset.classnames for t in templates]
        toks = model.tokenize(texts)
        tfeats = model.text_tower(**toks).double()  # (C*T, 32)
        eye = torch.eye(16, dtype=torch.float64)[:c]
        w_img = torch.linalg.pinv(feats) @ eye  # (32, 16): feats @ w_img = eye
        w_txt = torch.linalg.pinv(tfeats) @ eye.repeat_interleave(len(templates), 0)
        assert torch.allclose(feats @ w_img, eye, atol=1e-6)
        assert torch.allclose(tfeats @ w_txt, eye.repeat_interleave(len(templates), 0), atol=1e-6)
        model.image_head.weight.copy_(w_img.T.float())
        model.image_head.bias.zero_()
        model.text_head.weight.copy_(w_txt.T.float())
        model.text_head.bias.zero_()


def test_zeroshot_known_answer_accuracy_is_one(tiny_model, tmp_path):
    root = make_class_folder(tmp_path / "zs")
    names = ["crimson thing", "grass colour", "sky colour", "banana colour", "violet colour"]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    model = tiny_model()
    ds = class_folder(root)
    assert ds.classnames == names and len(ds) == 15
    templates = ["a {}", "a picture of a {}"]
    _align_heads(model, ds, templates)
    res = evaluate_zeroshot(model, ds, templates)
    assert res.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert res.confusion().trace() == 15
    # The names in a deranged order: every class now points at another class's prompts.
    deranged = names[1:] + names[:1]
    (root / "shifted.txt").write_text("\n".join(deranged))
    res = evaluate_zeroshot(model, class_folder(root, root / "shifted.txt"), templates)
    assert res.metrics["acc1"] == 0.0


def test_class_folder_dataset(tmp_path):
    root = make_class_folder(tmp_path / "zs", per_class=2)
    (root / "c1_green" / "notes.txt").write_text("not an image")
    solid((0, 0, 0)).save(root / "stray.png")
    (root / "empty_class").mkdir()
    ds = open_labeled(root)
    assert ds.classnames == ["c0 red", "c1 green", "c2 blue", "c3 yellow", "c4 purple"]  # _ reads as a space
    assert ds.labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ds.keys[0] == "c0_red/0.png"
    assert ds.problems and "stray.png" in ds.problems[0][0]
    (root / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(LittuneError, match="2 class names but .* 5 class folders"):
        class_folder(root)
    with pytest.raises(LittuneError, match="dataset not found"):
        open_labeled(tmp_path / "nope")
    with pytest.raises(LittuneError, match="no class folders"):
        class_folder(tmp_path / "zs" / "empty_class")


def test_label_csv_dataset(tmp_path):
    for name, rgb in COLOURS.items():
        solid(rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "labels.csv").write_text("filename,category\nred.png,warm\nblue.png,cold\nyellow.png,warm\n"
                                         "green.png,cold\n,warm\n")
    ds = label_csv(tmp_path / "labels.csv")
    assert ds.classnames == ["cold", "warm"]  # distinct labels, sorted
    assert ds.labels == [1, 0, 1, 0]
    assert ds.records[0].path == str(tmp_path / "red.png")
    assert ds.problems  # the row without an image
    # indices into a class-names file, which fixes the order
    (tmp_path / "idx.csv").write_text("image,label\nred.png,1\nblue.png,0\npurple.png,warm\n")
    (tmp_path / "names.txt").write_text("cold\nwarm\n")
    assert label_csv(tmp_path / "idx.csv", tmp_path / "names.txt").labels == [1, 0, 1]
    (tmp_path / "num.csv").write_text("image,label\nred.png,1\nblue.png,0\n")
    with pytest.raises(LittuneError, match="labels are numbers"):
        label_csv(tmp_path / "num.csv")
    with pytest.raises(LittuneError, match="label '7' of image 'red.png' is neither"):
        (tmp_path / "far.csv").write_text("image,label\nred.png,7\n")
        label_csv(tmp_path / "far.csv", tmp_path / "names.txt")
    (tmp_path / "two.csv").write_text("image,label\nred.png,warm\nred.png,hot\n")
    with pytest.raises(LittuneError, match="'red.png' has 2 labels"):
        label_csv(tmp_path / "two.csv")
    (tmp_path / "nolabel.csv").write_text("image,caption\nred.png,a red square\n")
    with pytest.raises(LittuneError, match="which column holds the label"):
        label_csv(tmp_path / "nolabel.csv")
    assert label_csv(tmp_path / "nolabel.csv", label_column="caption").classnames == ["a red square"]


def test_retrieval_dataset_groups_captions(tmp_path):
    for name, rgb in COLOURS.items():
        solid(rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\nred.png,a red square\nblue.png,blue\n"
                                        "red.png,crimson\nred.png,a red square\n")
    ds = open_retrieval(str(tmp_path / "pairs.csv"))
    assert [r.key for r in ds.records] == ["red.png", "blue.png"]
    assert ds.texts == ["a red square", "crimson", "blue"]
    assert ds.text_to_image == [0, 0, 1]
    (tmp_path / "empty.csv").write_text("image,caption\nred.png,\n")
    with pytest.raises(LittuneError, match="no captions"):
        open_retrieval(str(tmp_path / "empty.csv"))


def test_image_embeddings_skip_bad_images(tiny_model, tmp_path):
    root = make_class_folder(tmp_path / "zs", per_class=1)
    (root / "c0_red" / "bad.png").write_bytes(b"")
    model = tiny_model()
    ds = class_folder(root)
    with pytest.raises(LittuneError, match="bad.png"):  # by default a bad image is an error naming it
        image_embeddings(model, ds.records)
    emb, kept, skipped = image_embeddings(model, ds.records, skip_bad=True)
    assert len(ds) == 6 and emb.shape == (5, 16)
    assert [ds.keys[i] for i in range(len(ds)) if i not in kept] == ["c0_red/bad.png"]
    assert skipped[0][0].endswith("bad.png") and "empty" in skipped[0][1]
    res = evaluate_zeroshot(model, ds, ["{}"])
    assert len(res.labels) == 5 and len(res.skipped) == 1


def test_image_embeddings_from_cache_match_computed(tiny_model, tmp_path):
    cache_mod = pytest.importorskip("littune.cache")
    root = make_class_folder(tmp_path / "zs", per_class=2)
    model = tiny_model()
    from littune.data.sources import open_source

    cache_mod.embed_source(open_source(str(root)), model.image_tower, tmp_path / "cache", progress=False,
                           workers=0)
    ds = class_folder(root)
    direct, kept, _ = image_embeddings(model, ds.records)
    cached, kept_c, skipped = image_embeddings(model, ds.records, cache=tmp_path / "cache")
    assert kept_c == kept and not skipped
    assert torch.allclose(direct, cached, atol=2e-3)  # float16 cache
    # The cache's own rows, whole or batch by batch, are the same embeddings (keys in cache order).
    store = cache_mod.EmbeddingCache.open(tmp_path / "cache")
    order = [ds.keys.index(store.key(i)) for i in range(len(store))]
    assert torch.allclose(cached_image_embeddings(model, store), cached[order])
    batches = list(cached_image_embedding_batches(model, store, rows=[3, 1, 0], batch_size=2))
    assert [s for s, _ in batches] == [0, 2] and [len(e) for _, e in batches] == [2, 1]
    assert torch.allclose(torch.cat([e for _, e in batches]), cached_image_embeddings(model, store)[[3, 1, 0]], atol=1e-6)
    # A record the cache does not hold: skipped with skip_bad, else an error naming it.
    extra = make_class_folder(tmp_path / "more", per_class=3)
    more = class_folder(extra)
    _, kept_m, skipped_m = image_embeddings(model, more.records, cache=tmp_path / "cache", skip_bad=True)
    assert len(kept_m) == len(ds) and len(skipped_m) == len(more) - len(ds)
    assert all("not in the cache" in why for _, why in skipped_m)
    with pytest.raises(LittuneError, match="is not in the cache"):
        image_embeddings(model, more.records, cache=tmp_path / "cache")
    with pytest.raises(LittuneError, match="must be a record with a key"):
        image_embeddings(model, [more.records[0].path], cache=tmp_path / "cache")
    unlocked = tiny_model("Uu")
    with pytest.raises(LittuneError, match="evaluate without --cache"):
        image_embeddings(unlocked, ds.records, cache=tmp_path / "cache")


def test_validation_and_eval_zeroshot_label_nested_class_folders_alike(tiny_model, tmp_path):
    """`cat/2019/x.png` is a cat for `littune eval zeroshot` and for validation during training alike (the
    top-level folder under the root, as torchvision's ImageFolder has it); keys written relative to a
    CSV beside the split folder (`val/<class>/<image>`, the emoji evaluation splits) keep their class."""
    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.eval.sets import folder_labels
    from littune.train.validation import class_labels, zeroshot_on_cache

    root = tmp_path / "zs"
    for rel, rgb in (("cat/2019/a.png", COLOURS["red"]), ("cat/2020/b.png", COLOURS["red"]),
                     ("cat/c.png", COLOURS["red"]), ("dog/2019/d.png", COLOURS["blue"]), ("dog/e.png", COLOURS["blue"])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        solid(rgb).save(root / rel)
    model = tiny_model()
    ds = open_labeled(root)
    assert ds.classnames == ["cat", "dog"] and ds.labels == [0, 0, 0, 1, 1]
    cache = embed_source(open_source(str(root)), model.image_tower, tmp_path / "cache", workers=0, progress=False)
    names, labels = class_labels(cache)
    by_key = dict(zip(ds.keys, ds.labels))
    assert names == ds.classnames and labels == [by_key[cache.key(i)] for i in range(len(cache))]
    res = evaluate_zeroshot(model, ds, littune.eval.load_templates("short"), cache=tmp_path / "cache")
    assert zeroshot_on_cache(model, cache) == pytest.approx(res.metrics)
    assert folder_labels(["val/cat/1.png", "val/dog/2.png", "val/cat/3.png"]) == (["cat", "dog"], [0, 1, 0])
