"""Zero-shot and retrieval metrics against hand-computed values (ties, multi-caption images), templates."""

import numpy as np
import pytest
import torch

from littune.errors import LittuneError
from littune.eval.retrieval import retrieval_metrics, retrieval_ranks
from littune.eval.templates import builtin_sets, fill, load_templates
from littune.eval.zeroshot import (confusion_matrix, per_class_table, true_class_rank, zeroshot_classifier,
                                   zeroshot_metrics)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- zero-shot ------------------------------------------------------------------------------------
LOGITS = [[3, 1, 2],   # true 0: rank 0
          [1, 3, 2],   # true 2: class 1 higher -> rank 1
          [2, 2, 1],   # true 1: tied with class 0, lower index wins -> rank 1
          [0, 0, 0],   # true 2: tied with 0 and 1 -> rank 2
          [1, 2, 3]]   # true 0: 1 and 2 higher -> rank 2
LABELS = [0, 2, 1, 2, 0]


def test_zeroshot_metrics_hand_computed_with_ties():
    assert true_class_rank(LOGITS, LABELS).tolist() == [0, 1, 1, 2, 2]
    m = zeroshot_metrics(np.array(LOGITS, dtype=np.float32), LABELS, topk=(1, 2, 3, 5))
    assert m["acc1"] == pytest.approx(1 / 5)
    assert m["acc2"] == pytest.approx(3 / 5)
    assert m["acc3"] == 1.0
    assert m["acc5"] == 1.0  # k >= number of classes: always right
    # class 0: rows 0 (right), 4 (wrong) -> 0.5; class 1: row 2 (wrong) -> 0; class 2: rows 1, 3 -> 0
    assert m["mean_per_class_recall"] == pytest.approx(0.5 / 3)
    # default keys are CLIP_benchmark's
    keys = set(zeroshot_metrics(torch.tensor(LOGITS, dtype=torch.float32), LABELS))
    assert keys == {"acc1", "acc5", "mean_per_class_recall"}


def test_tie_goes_to_lower_class_index():
    # The same tied row is right for class 0 and wrong for class 1: deterministic, like argmax.
    assert zeroshot_metrics([[1.0, 1.0]], [0], topk=(1,))["acc1"] == 1.0
    assert zeroshot_metrics([[1.0, 1.0]], [1], topk=(1,))["acc1"] == 0.0
    assert zeroshot_metrics([[1.0, 1.0]], [1], topk=(2,))["acc2"] == 1.0


def test_mean_per_class_recall_ignores_absent_classes_and_weights_classes_equally():
    # 4 samples of class 0 all right, 1 sample of class 2 wrong; class 1 absent.
    logits = [[5, 0, 0]] * 4 + [[5, 0, 1]]
    m = zeroshot_metrics(logits, [0, 0, 0, 0, 2], topk=(1,))
    assert m["acc1"] == pytest.approx(0.8)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)


def test_zeroshot_metrics_rejects_bad_input():
    with pytest.raises(LittuneError, match="out of range"):
        zeroshot_metrics([[1, 2]], [2])
    with pytest.raises(LittuneError, match="NaN"):
        zeroshot_metrics([[float("nan"), 1.0]], [0])
    with pytest.raises(LittuneError, match="1-D sequence of 2"):
        zeroshot_metrics([[1, 2], [2, 1]], [0])
    with pytest.raises(LittuneError, match="no samples"):
        zeroshot_metrics(np.zeros((0, 3)), [])


def test_confusion_matrix_and_per_class_table():
    cm = confusion_matrix(LOGITS, LABELS)
    # predictions (argmax, ties low): [0, 1, 0, 0, 2]
    expected = np.zeros((3, 3), dtype=np.int64)
    for t, p in zip(LABELS, [0, 1, 0, 0, 2]):
        expected[t, p] += 1
    assert (cm == expected).all()
    rows = per_class_table(LOGITS, LABELS, ["cat", "dog", "horse"], topk=2)
    by = {r["class"]: r for r in rows}
    assert by["cat"]["n"] == 2 and by["cat"]["recall"] == 0.5 and by["cat"]["recall@2"] == 0.5
    assert by["cat"]["precision"] == pytest.approx(1 / 3)  # predicted 3 times, right once
    assert by["dog"]["most_confused_with"] == "cat"
    assert by["horse"]["precision"] == 0.0 and by["horse"]["recall"] == 0.0
    assert by["horse"]["most_confused_with"] in ("cat", "dog")


# -- retrieval ------------------------------------------------------------------------------------
# Image embeddings = identity, so sim[t, i] = TEXT[t][i].
TEXT = [[0.9, 0.1, 0.5],   # caption of image 0: rank 0
        [0.2, 0.8, 0.2],   # caption of image 0: image 1 higher -> rank 1 (image 2 ties but has a higher index)
        [0.7, 0.7, 0.1],   # caption of image 1: tied with image 0 (lower index) -> rank 1
        [0.3, 0.3, 0.3],   # caption of image 2: tied with 0 and 1 -> rank 2
        [0.1, 0.6, 0.4]]   # caption of image 2: image 1 higher -> rank 1
OWNER = [0, 0, 1, 2, 2]


def test_retrieval_metrics_hand_computed_multi_caption():
    t_rank, i_rank = retrieval_ranks(np.eye(3), np.array(TEXT), OWNER)
    assert t_rank.tolist() == [0, 1, 1, 2, 1]
    # image 0 column [.9 .2 .7 .3 .1]: own captions 0, 1 -> best .9 -> rank 0
    # image 1 column [.1 .8 .7 .3 .6]: own caption 2 (.7), caption 1 higher -> rank 1
    # image 2 column [.5 .2 .1 .3 .4]: own 3 (.3), 4 (.4) -> best .4, caption 0 higher -> rank 1
    assert i_rank.tolist() == [0, 1, 1]
    m = retrieval_metrics(torch.eye(3), torch.tensor(TEXT), OWNER, ks=(1, 2, 3))
    assert m["image_retrieval_recall@1"] == pytest.approx(1 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@3"] == 1.0
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    assert set(retrieval_metrics(np.eye(3), np.array(TEXT), OWNER)) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_retrieval_ties_for_image_queries():
    # Image 1's two captions tie with each other: its best-placed one is caption 0 -> rank 0.
    t_rank, i_rank = retrieval_ranks(np.eye(2), np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.5]]), [1, 0, 1])
    assert i_rank.tolist() == [0, 0]
    assert t_rank.tolist() == [1, 0, 0]  # caption 0 ties between images 0 and 1: image 0 first
    # Image 1's caption ties with image 0's caption, which has the lower index -> rank 1.
    m = retrieval_metrics(np.eye(2), np.array([[0.5, 0.5], [0.1, 0.5]]), [0, 1], ks=(1,))
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@1"] == 1.0  # caption 0 ties images 0 and 1: its own image 0 wins


def test_images_without_captions_are_distractors_only():
    # Images 1 and 2 have no caption: they do not count as image queries.
    m = retrieval_metrics(np.eye(3), np.array([[0.2, 0.9, 0.1], [0.8, 0.1, 0.1]]), [0, 0], ks=(1, 2))
    assert m["text_retrieval_recall@1"] == 1.0  # image 0: caption 1 is its top caption
    assert m["image_retrieval_recall@1"] == 0.5  # caption 0 prefers the captionless image 1
    assert m["image_retrieval_recall@2"] == 1.0


def _reference_ranks(img, txt, owner):
    sim = txt @ img.T
    t_rank = []
    for t in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda i: (-sim[t, i], i))
        t_rank.append(order.index(owner[t]))
    i_rank = []
    for i in range(sim.shape[1]):
        order = sorted(range(sim.shape[0]), key=lambda t: (-sim[t, i], t))
        mine = [order.index(t) for t in range(sim.shape[0]) if owner[t] == i]
        i_rank.append(min(mine) if mine else -1)
    return t_rank, i_rank


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_ranks_match_a_reference_sort_in_any_chunking(chunk):
    rng = np.random.default_rng(1)
    # Quantised values make exact ties common.
    img = np.round(rng.standard_normal((9, 4)), 1).astype(np.float32)
    txt = np.round(rng.standard_normal((20, 4)), 1).astype(np.float32)
    owner = rng.integers(0, 8, size=20).tolist()  # image 8 has no caption
    t_rank, i_rank = retrieval_ranks(img, txt, owner, chunk=chunk)
    ref_t, ref_i = _reference_ranks(img, txt, owner)
    assert t_rank.tolist() == ref_t
    assert i_rank.tolist() == ref_i


def _reference_grouped_ranks(img, txt, owner, groups):
    """Rank = how many items come before the first item of the query's group in a full sort."""
    sim = txt @ img.T
    t_rank = []
    for t in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda i: (-sim[t, i], i))
        t_rank.append(next(r for r, i in enumerate(order) if groups[i] == groups[owner[t]]))
    i_rank = []
    for i in range(sim.shape[1]):
        order = sorted(range(sim.shape[0]), key=lambda t: (-sim[t, i], t))
        ranks = [r for r, t in enumerate(order) if groups[owner[t]] == groups[i]]
        i_rank.append(ranks[0] if ranks else -1)
    return t_rank, i_rank


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_grouped_retrieval_counts_any_image_of_the_group(chunk):
    # One concept in two designs shares its captions: either design answers them.
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    txt = np.array([[0.0, 1.0]], dtype=np.float32)  # closest to image 1, captioned on image 0
    assert retrieval_ranks(img, txt, [0], chunk=chunk)[0].tolist() == [2]
    t_rank, i_rank = retrieval_ranks(img, txt, [0], chunk=chunk, image_groups=[5, 5, 6])
    assert t_rank.tolist() == [0] and i_rank.tolist() == [0, 0, -1]
    rng = np.random.default_rng(2)
    img = np.round(rng.standard_normal((10, 3)), 1).astype(np.float32)
    txt = np.round(rng.standard_normal((25, 3)), 1).astype(np.float32)
    owner = rng.integers(0, 9, size=25).tolist()
    groups = rng.integers(0, 4, size=10).tolist()
    got = retrieval_ranks(img, txt, owner, chunk=chunk, image_groups=groups)
    ref = _reference_grouped_ranks(img, txt, owner, groups)
    assert got[0].tolist() == ref[0] and got[1].tolist() == ref[1]
    assert retrieval_ranks(img, txt, owner, image_groups=list(range(10)))[0].tolist() == \
        _reference_ranks(img, txt, owner)[0]
    with pytest.raises(LittuneError, match="image_groups has 2 entries for 10 images"):
        retrieval_ranks(img, txt, owner, image_groups=[0, 1])


def test_retrieval_rejects_bad_input():
    with pytest.raises(LittuneError, match="2 entries for 3 texts"):
        retrieval_metrics(np.eye(2), np.eye(3, 2), [0, 1])
    with pytest.raises(LittuneError, match="there are 2 images"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 2])
    with pytest.raises(LittuneError, match="3-d"):
        retrieval_metrics(np.eye(2), np.ones((2, 3)), [0, 1])


# -- templates ------------------------------------------------------------------------------------
def test_builtin_template_sets():
    assert {"emoji", "imagenet", "imagenet7", "short", "none"} <= set(builtin_sets())
    imagenet = load_templates("imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert len(load_templates("imagenet7")) == 7
    assert load_templates("none") == ["{}"]
    assert all("{}" in t for t in load_templates("short"))
    assert fill("a {} in a {video} game", "cat") == "a cat in a {video} game"


def test_user_template_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my prompts\n\na sketch of a {}\n  {} emoji  \n", encoding="utf-8")
    assert load_templates(str(f)) == ["a sketch of a {}", "{} emoji"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}\na photo\n")
    with pytest.raises(LittuneError, match=r"bad.txt:2: template 'a photo' has no"):
        load_templates(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(LittuneError, match="holds no templates"):
        load_templates(str(empty))
    with pytest.raises(LittuneError, match="unknown template set 'imagenett'.*emoji, imagenet, imagenet7, none, short"):
        load_templates("imagenett")


# -- the classifier -------------------------------------------------------------------------------
def test_zeroshot_classifier_is_the_renormalised_mean_of_normalised_prompts(tiny_model):
    model = tiny_model()
    model.train()
    names, templates = ["red apple", "black dog", "cat"], ["a {}", "a photo of a {}", "{}!"]
    w = zeroshot_classifier(model, names, templates)
    assert model.training  # the mode is restored
    assert w.shape == (3, 16)
    for c, name in enumerate(names):
        e = model.encode_texts([t.replace("{}", name) for t in templates])
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
        ref = torch.nn.functional.normalize(e.mean(0), dim=0)
        assert torch.allclose(w[c], ref, atol=1e-5)
    # one template: just that prompt's embedding
    assert torch.allclose(zeroshot_classifier(model, ["cat"], ["{}"])[0], model.encode_texts(["cat"])[0], atol=1e-5)
    with pytest.raises(LittuneError, match="label list is empty"):
        zeroshot_classifier(model, [], templates)
    with pytest.raises(LittuneError, match="has no"):
        zeroshot_classifier(model, ["cat"], ["a photo"])
