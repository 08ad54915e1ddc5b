"""The attention-pooling image head (model.image_head=attention, littune.model.heads) and ``hf:...#cls+mean``.

The head reads the locked tower's tokens (its map, flattened), starts exactly as the linear head, saves and
loads as data, exports to ONNX with the tower, draws exact heat maps and trains -- on the fly from pixels, and
from a token cache without running the tower. Token caches are another engineer's work: the cache path is
tested through the contract they implement (``has_tokens``, ``token_grid``, ``token_dim``, ``tokens(rows)``),
with a wrapper of a real cache whose tokens come from the real tower (:class:`TokenCache`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import CAPTIONS, TINY_TEXT
from littune.config import load_config
from littune.errors import ConfigError, LittuneError, StaleCacheError
from littune.inference.heatmap import spatial_embeddings
from littune.towers.tiny import SPEC

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"


def lit(tower=SPEC, head="attention", blocks=0, seed=0, setting="Lu"):
    from littune import LiTConfig, LiTModel

    torch.manual_seed(seed)
    cfg = LiTConfig(setting=setting, image_tower=tower, text_tower=dict(TINY_TEXT), embed_dim=16, image_head=head,
                    image_head_blocks=blocks)
    return LiTModel.from_config(cfg, captions=CAPTIONS).eval()


def _perturb(model) -> None:
    """Move every head parameter off its initial value, as training does (the zero scales included)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.image_head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def test_the_attention_head_reads_the_towers_tokens_and_gives_unit_embeddings():
    model = lit(blocks=1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.image_features(x)
        emb = model.embed_image_features(tokens)
    assert tokens.shape == (3, 16, 32)  # the tiny CNN's 4 x 4 map of 32 channels
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(emb, model.encode_image(x).detach())
    assert model.image_head.heads == 1 and len(model.image_head.blocks) == 1
    with pytest.raises(LittuneError, match=r"reads tokens \(batch, tokens, 32\), not \[3, 32\]"):
        model.embed_image_features(model.image_tower(x))


@pytest.mark.parametrize("blocks", [0, 1])
def test_the_attention_head_starts_exactly_as_the_linear_head(blocks):
    """Zero residual scales and a projection drawn first: at initialisation the attention head is the linear
    head on the mean of the tokens -- for a mean-pooled tower, the linear head, bit for bit."""
    linear, attention = lit(head="linear"), lit(blocks=blocks)
    assert torch.equal(attention.image_head.proj.weight, linear.image_head.weight)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(attention.encode_image(x), linear.encode_image(x))
        _perturb(attention)
        assert not torch.allclose(attention.encode_image(x), linear.encode_image(x), atol=1e-3)


def test_several_heads_pool_as_attention_with_per_token_values_and_their_shares_sum_to_it():
    """Two heads over 128-wide tokens: the pooled-then-projected values equal attention over per-token values,
    and each location's share (the heat map's) averages to the head's output."""
    from littune.model.heads import AttentionPoolHead

    torch.manual_seed(0)
    head = AttentionPoolHead(128, 8, blocks=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        x = torch.randn(3, 10, 128)
        assert head.heads == 2
        y = x
        for block in head.blocks:
            y = block(y)
        n = head.norm(y)
        a = head.attention(x)
        v = head.value(n).reshape(3, 10, 2, 64)  # per-token values, then attention per head
        logits = torch.einsum("btf,hf->bht", n, head.query) / 8.0
        pooled = torch.einsum("bht,bthd->bhd", torch.softmax(logits, -1), v).reshape(3, 128)
        want = head.proj(y.mean(1) + head.gamma * head.out(pooled))
        assert torch.allclose(head(x), want, atol=1e-5)
        assert torch.allclose(a, torch.softmax(logits, -1).mean(1))
        assert torch.allclose(head.location_embeddings(x).mean(1), want, atol=1e-5)


def test_an_attention_heads_heat_map_is_each_locations_share_of_the_image_embedding():
    model = lit(blocks=1)
    _perturb(model)
    x = torch.randn(2, 3, 32, 32)
    emb, sf = spatial_embeddings(model, x)
    with torch.no_grad():
        whole = model.image_head(model.image_features(x))
        weights = model.image_head.attention(model.image_features(x))
    assert emb.shape == (2, 4, 4, 16) and sf.exact and "attention head" in sf.how
    assert torch.allclose(emb.mean(dim=(1, 2)), whole, atol=1e-5)
    assert weights.shape == (2, 16) and torch.allclose(weights.sum(-1), torch.ones(2))
    hm = model.heatmap(DATA / "chelsea.jpg", ["cat", "cup of coffee"])
    assert hm.maps.shape == (2, 4, 4) and hm.exact
    assert np.allclose(hm.pooled, (model.encode_images(DATA / "chelsea.jpg") @
                                   model.encode_texts(["cat", "cup of coffee"]).T)[0].numpy(), atol=1e-5)


def test_save_and_load_give_identical_embeddings_and_the_folder_is_data(tmp_path):
    from littune import load

    model = lit(blocks=1)
    _perturb(model)
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["config"]["image_head"] == "attention" and meta["config"]["image_head_blocks"] == 1
    assert meta["image_token_dim"] == 32
    assert not [p for p in (tmp_path / "m").rglob("*") if p.suffix in (".py", ".pkl", ".pt", ".bin")]
    again = load(tmp_path / "m")
    images = [DATA / "chelsea.jpg", DATA / "coffee.jpg"]
    assert torch.equal(again.encode_images(images), model.encode_images(images))
    assert torch.allclose(again.encode_images(images, batch_size=1), model.encode_images(images), atol=1e-6)


def test_a_bad_token_width_in_config_json_is_one_line(tmp_path):
    from littune import load

    lit().save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**meta, "image_token_dim": "32; import os"}))
    with pytest.raises(LittuneError, match=r"^the attention image head's token width must be a positive integer, "
                                           r"not '32; import os' \(image_token_dim"):
        load(tmp_path / "m")


def test_classify_with_an_attention_head_and_its_heat_map(tmp_path, capsys):
    from littune.cli import main

    model = lit()
    _perturb(model)
    model.save_pretrained(tmp_path / "m")
    labels = ["cat", "cup of coffee"]
    assert main(["classify", "--model", str(tmp_path / "m"), str(DATA / "chelsea.jpg"), "--labels", ",".join(labels),
                 "--heatmap", str(tmp_path / "hm.png"), "--json", "--templates", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = model.classify(DATA / "chelsea.jpg", labels, templates="none")[0]
    got = {r["label"]: r["probability"] for r in out[0]["labels"]}
    assert got == pytest.approx({c: float(p) for c, p in zip(labels, want)}, abs=1e-5)
    assert (tmp_path / "hm.png").stat().st_size > 0


def test_littune_export_writes_an_image_graph_with_the_towers_map_and_the_head(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    from littune.cli import main

    model = lit(blocks=1)
    _perturb(model)
    model.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "littune_onnx.json").read_text())
    assert record["image_skipped"] is None and record["image"]["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "onnx" / "image.onnx")).run(None, {"pixels": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model.encode_image(x).numpy()).max() <= 1e-4


@pytest.mark.parametrize("override, message", [
    ("model.image_head_blocks=2", "model.image_head_blocks: 0 or 1 (transformer blocks before the attention "
                                  "pooling), got 2"),
    ("model.image_head_blocks=1", "model.image_head_blocks: 1 blocks need model.image_head=attention, not 'linear'"),
    ("model.image_head=attn", "model.image_head: 'attn' is not one of linear, identity, mlp, attention"),
])
def test_bad_attention_head_settings_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value) == message


# -- cls+mean ---------------------------------------------------------------------------------------
def _tiny_vit(folder: Path) -> Path:
    from test_heatmap import _tiny_vit as tiny_vit  # one tiny random ViT for the heat-map and head tests

    return tiny_vit(folder)


def test_cls_plus_mean_pooling_concatenates_cls_and_the_patch_mean_and_keys_its_own_caches(tmp_path):
    from littune.cache import write_cache
    from littune.towers.image import build_image_tower

    vit = _tiny_vit(tmp_path / "vit")
    towers = {p: build_image_tower(f"hf:{vit}#{p}").eval() for p in ("cls", "mean", "cls+mean")}
    both = towers["cls+mean"]
    assert both.dim == 48 and towers["cls"].dim == 24
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = both.net(pixel_values=x).last_hidden_state
        assert torch.equal(both(x), torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1))
        assert torch.equal(both(x), torch.cat([towers["cls"](x), towers["mean"](x)], dim=-1))
    prints = {p: t.fingerprint() for p, t in towers.items()}
    assert len(set(prints.values())) == 3 and prints["cls+mean"].startswith("hf:vit#cls+mean|")
    cache = write_cache(tmp_path / "cache", np.zeros((2, 24), np.float32), ["a", "b"], towers["cls"])
    cache.check(tower_fingerprint=prints["cls"])
    with pytest.raises(StaleCacheError):
        cache.check(tower_fingerprint=prints["cls+mean"])


def test_a_cls_plus_mean_towers_map_is_exact_and_the_attention_head_starts_as_its_linear_head(tmp_path):
    vit = _tiny_vit(tmp_path / "vit")
    tower = f"hf:{vit}#cls+mean"
    linear, attention = lit(tower, head="linear"), lit(tower)
    x = torch.randn(2, 3, 32, 32)
    emb, sf = spatial_embeddings(linear, x)  # [CLS ; patch] at each of the 4 x 4 locations
    with torch.no_grad():
        assert sf.features.shape == (2, 4, 4, 48) and sf.exact
        assert torch.allclose(emb.mean(dim=(1, 2)), linear.image_head(linear.image_features(x)), atol=1e-5)
        assert torch.allclose(attention.encode_image(x), linear.encode_image(x), atol=1e-6)


# -- training ----------------------------------------------------------------------------------------
def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_on_the_fly_with_an_attention_head_lowers_the_loss(tmp_path):
    from test_trainer import TINY, make_source

    from littune import load
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data")
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.source={src}", "data.on_the_fly=true",
                                        "data.augment=false", "data.workers=0", "steps=100", "model.image_head=attention",
                                        "model.image_head_blocks=1"])
    out = Trainer(cfg).run()
    losses = _losses(tmp_path / "run")
    assert len(losses) == 100 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    model = load(out, trust_code=True)
    assert float(model.image_head.gamma.detach().abs().max()) > 0  # the attention path was trained in


def test_a_cache_without_tokens_is_refused_in_one_line(tmp_path):
    from test_trainer import TINY, make_source

    from littune.cache import embed_source
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data", per_class=1)
    embed_source(str(src), SPEC, tmp_path / "cache", batch_size=8, progress=False)  # pooled features only
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.source={src}",
                                        f"data.cache={tmp_path / 'cache'}", "steps=2", "model.image_head=attention"])
    with pytest.raises(LittuneError) as e:
        Trainer(cfg).run()
    assert str(e.value).startswith("model.image_head=attention trains from a token cache: littune embed ... --tokens")
    assert "\n" not in str(e.value)


def test_a_missing_cache_for_the_attention_head_is_built_with_tokens_and_trains(tmp_path):
    from test_trainer import TINY, make_source

    from littune.cache import EmbeddingCache
    from littune.train.trainer import Trainer

    src = make_source(tmp_path / "data", per_class=1)
    cfg = load_config(overrides=TINY + [f"run_dir={tmp_path / 'run'}", f"data.source={src}",
                                        f"data.cache={tmp_path / 'cache'}", "steps=2", "model.image_head=attention"])
    Trainer(cfg).run()
    assert EmbeddingCache.open(tmp_path / "cache").has_tokens
    assert len(_losses(tmp_path / "run")) == 2


def _token_cache(tmp_path, spec: str, grid=True, name: str = "cache"):
    """A real token cache (``embed_source(tokens=grid)``) of ``spec`` over the coloured-shapes source."""
    from test_trainer import make_source

    from littune.cache import embed_source
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    src = tmp_path / "data" / "pairs.csv"
    src = src if src.exists() else make_source(tmp_path / "data")  # one source for several caches
    tower = build_image_tower(yaml.safe_load(spec.split("=", 1)[1])).eval()
    cache = embed_source(open_source(str(src)), tower, tmp_path / name, batch_size=8, progress=False, tokens=grid)
    assert cache.has_tokens
    return src, cache


def _train_from_tokens(tmp_path, spec: str, cache, src, *extra, steps: int = 80):
    from test_trainer import TINY

    from littune.train.trainer import Trainer

    val = "val.retrieval=[{name: train, cache: '" + str(cache.directory) + "'}]"
    cfg = load_config(overrides=TINY + [spec, f"run_dir={tmp_path / 'run'}", f"data.source={src}",
                                        f"data.cache={cache.directory}", f"steps={steps}",
                                        "model.image_head=attention", val, *extra])
    return Trainer(cfg).run()


def _pixels(model, cache, rows) -> torch.Tensor:
    from littune.data.decode import load_image

    return torch.stack([model.preprocess.eval(load_image(cache.path(i))) for i in rows])


def test_training_from_a_token_cache_never_runs_the_tower_and_lowers_the_loss(tmp_path):
    """A real token cache (``embed_source(tokens=True)``, the real reader): training and validation read its
    tokens, the tower is never run, and the trained head embeds pixels as it embedded the cached tokens."""
    import counting_tower
    from test_trainer import COUNTED

    from littune import load

    src, cache = _token_cache(tmp_path, COUNTED)
    assert cache.token_grid == (4, 4) and cache.token_dim == 32
    counting_tower.BUILT.clear()
    out = _train_from_tokens(tmp_path, COUNTED, cache, src)
    assert len(counting_tower.BUILT) == 2 and not any(counting_tower.BUILT)  # built to fingerprint and export, never run
    losses = _losses(tmp_path / "run")
    assert len(losses) == 80 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["text_retrieval_recall@10"] > 0.5  # validated from the tokens (chance: 10/64)
    model = load(out, trust_code=True)
    assert model.config.image_head == "attention" and not any(counting_tower.BUILT)
    with torch.no_grad():
        from_cache = model.embed_image_features(torch.from_numpy(cache.tokens(range(4))))
        assert torch.allclose(model.encode_image(_pixels(model, cache, range(4))), from_cache, atol=1e-2)


def test_a_model_trained_on_a_pooled_token_grid_pools_the_towers_map_to_it_in_encode_image_onnx_and_heat_maps(
        tmp_path):
    """``--tokens 2`` over the tiny tower's 4 x 4 map: the head trains on 2 x 2 average-pooled tokens, so the
    saved model records the grid (config.json) and pools the tower's map to it wherever it runs the tower."""
    ort = pytest.importorskip("onnxruntime")
    from test_trainer import TINY

    from littune import load
    from littune.export.onnx import export_onnx_model

    spec = TINY[1]
    src, cache = _token_cache(tmp_path, spec, grid=2)
    assert cache.token_grid == (2, 2)
    out = _train_from_tokens(tmp_path, spec, cache, src, "model.image_head_blocks=1", steps=40)
    meta = json.loads((out / "config.json").read_text())
    model = load(out, trust_code=True)
    px = _pixels(model, cache, range(6))
    with torch.no_grad():
        from_cache = model.embed_image_features(torch.from_numpy(cache.tokens(range(6))))
        got = model.encode_image(px)
    assert (got - from_cache).abs().max() < 1e-3  # float16 tokens (measured 6e-5; 1.7e-2 feeding the 4 x 4 map)
    assert meta["image_token_grid"] == [2, 2]
    hm = model.heatmap(cache.path(0), ["red square", "blue circle"])
    assert hm.maps.shape == (2, 2, 2)
    assert np.allclose(hm.pooled, (got[:1] @ model.encode_texts(["red square", "blue circle"]).T)[0].numpy(),
                       atol=1e-5)
    export_onnx_model(model, tmp_path / "onnx")
    onnx = ort.InferenceSession(str(tmp_path / "onnx" / "image.onnx")).run(None, {"pixels": px.numpy()})[0]
    assert np.abs(onnx - got.numpy()).max() <= 1e-4


def test_a_validation_cache_of_another_token_grid_is_one_line_naming_it(tmp_path):
    from test_trainer import TINY

    spec = TINY[1]
    src, pooled = _token_cache(tmp_path, spec, grid=2)
    _, native = _token_cache(tmp_path, spec, name="native")
    with pytest.raises(LittuneError) as e:
        _train_from_tokens(tmp_path, spec, pooled, src, "val.zeroshot=[{cache: '" + str(native.directory) + "'}]")
    assert str(e.value) == (f"val.zeroshot[0]: the cache {native.directory} holds 4 x 4 tokens; the attention image "
                            "head reads 2 x 2 tokens (the grid it was trained on): littune embed SOURCE --out CACHE "
                            "--tokens 2 stores them")
    assert not (tmp_path / "run" / "model").exists()


def test_a_bad_token_grid_in_config_json_is_one_line(tmp_path):
    from littune import load

    lit().save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["image_token_grid"] is None  # not trained from a token cache: the tower's own map
    (tmp_path / "m" / "config.json").write_text(json.dumps({**meta, "image_token_grid": [2, "x"]}))
    with pytest.raises(LittuneError, match=r"^the attention image head's token grid must be two positive integers "
                                           r"\[h, w\], not \[2, 'x'\] \(image_token_grid"):
        load(tmp_path / "m")


def test_embed_tokens_train_eval_index_classify_from_the_cli_agree(tmp_path, monkeypatch, capsys):
    """``littune embed --tokens`` -> ``littune train`` (attention head) -> ``littune eval`` from the token cache,
    from the pixels and reusing the cache's rows -> ``littune index`` -> ``littune classify``: all agree."""
    import os
    import time

    from test_trainer import TINY, make_source

    from littune import load
    from littune.cli import main
    from littune.data.sources import open_source
    from littune.inference.embeddings import image_embeddings

    monkeypatch.setenv("LITTUNE_CACHE", str(tmp_path / "home"))  # a feature index of this test's own
    src = make_source(tmp_path / "data")
    hour_ago = time.time() - 3600  # a file modified within 2 s is never entered in the feature index
    for p in (tmp_path / "data").rglob("*.png"):
        os.utime(p, (hour_ago, hour_ago))
    cache, run = tmp_path / "cache", tmp_path / "run"
    tower = TINY[1].split("=", 1)[1]
    assert main(["embed", str(src), "--out", str(cache), "--tokens", "--tower", json.dumps(yaml.safe_load(tower)),
                 "-q"]) == 0
    sets = [x for o in TINY + [f"run_dir={run}", f"data.source={src}", f"data.cache={cache}", "steps=40",
                               "model.image_head=attention"] for x in ("--set", o)]
    assert main(["train", *sets]) == 0
    model = load(run / "model")
    assert model.image_head.grid == (4, 4)
    outs = {}
    for name, extra in (("cache", ["--cache", str(cache)]), ("pixels", ["--no-reuse"]), ("reused", [])):
        capsys.readouterr()
        assert main(["eval", "retrieval", str(src), "--model", str(run / "model"), "--out",
                     str(tmp_path / f"{name}.json"), "-q", *extra]) == 0
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
        if name == "reused":
            assert "reused 64" in capsys.readouterr().err
    assert outs["reused"] == outs["cache"] and outs["pixels"] == pytest.approx(outs["cache"], abs=0.04)
    records = list(open_source(str(src)))
    from_cache = image_embeddings(model, records, cache=cache)[0]
    reused = image_embeddings(model, [r.path for r in records], reuse=True)[0]
    with torch.no_grad():
        pixels = model.encode_image(torch.stack([model.preprocess.eval(model_image(r.path)) for r in records]))
    print("max |eval from the token cache - encode_image|:", float((from_cache - pixels).abs().max()))
    assert (from_cache - pixels).abs().max() < 2e-3  # float16 tokens, onnxruntime's map vs torch's
    assert torch.allclose(reused, from_cache, atol=1e-6)
    capsys.readouterr()
    assert main(["index", str(src), "--model", str(run / "model"), "--out", str(tmp_path / "index"), "-q"]) == 0
    assert f"embedded 0 new images, reused 64 from {cache}" in capsys.readouterr().out  # a token cache's rows
    index = np.load(tmp_path / "index" / "embeddings.npy")  # float16
    assert np.abs(index - from_cache.numpy()).max() < 5e-4
    labels = ["red square", "blue circle", "green triangle"]
    capsys.readouterr()
    assert main(["classify", "--model", str(run / "model"), records[0].path, "--labels", ",".join(labels), "--json",
                 "--templates", "none"]) == 0
    got = {r["label"]: r["probability"] for r in json.loads(capsys.readouterr().out)[0]["labels"]}
    want = model.classify(records[0].path, labels, templates="none")[0]
    assert got == pytest.approx({c: float(p) for c, p in zip(labels, want)}, abs=1e-5)


def model_image(path):
    from littune.data.decode import load_image

    return load_image(path)


def test_eval_and_index_with_an_attention_head_refuse_a_cache_without_tokens_in_one_line(tmp_path, capsys):
    from test_trainer import make_source

    from littune.cache import embed_source
    from littune.cli import main
    from littune.data.sources import open_source
    from littune.towers.image import build_image_tower

    src = make_source(tmp_path / "data", per_class=1)
    plain = embed_source(open_source(str(src)), build_image_tower(SPEC).eval(), tmp_path / "plain", progress=False)
    lit().save_pretrained(tmp_path / "m")
    for argv in (["eval", "retrieval", str(src), "--cache", str(plain.directory)],
                 ["index", str(src), "--cache", str(plain.directory), "--out", str(tmp_path / "index")]):
        capsys.readouterr()
        assert main([*argv, "--model", str(tmp_path / "m"), "-q"]) != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "holds pooled features only" in err and "--tokens" in err, err
