"""Fast decoding (``Preprocess(decode="fast")``, ``littune embed --fast-decode``): JPEG draft + reducing_gap.

Opt-in: the default pixels and keys do not move (so saved models and caches stay valid); fast pixels
stay within a stated tolerance of exact ones, features within a stated cosine, and the key (the
tower's fingerprint) says which decoding made a cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import encode, tiny_tower_arg
from littune.cache import EmbeddingCache
from littune.cli import main
from littune.data.decode import JPEG_INFO, load_image
from littune.data.preprocess import Preprocess
from littune.towers.image import build_image_tower

DATA = Path(__file__).parent / "data"
#: fast vs exact uint8 pixels of a 2x-drafted photo: mean |diff| and the 99th percentile, in levels of 255
MEAN_LEVELS, P99_LEVELS = 1.0, 4


def _photo_jpeg(size=(1200, 900), name="chelsea.jpg") -> bytes:
    """A real photo, large enough that the eval target (256 px) lets it decode at 1/2 scale."""
    return encode(Image.open(DATA / name).convert("RGB").resize(size, Image.Resampling.BICUBIC), "JPEG", quality=90)


def _reference_eval_pixels(data: bytes, p: Preprocess) -> np.ndarray:
    """Today's exact path written out with plain Pillow: full decode, one bicubic resize, centre crop."""
    import io

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = p.resize_to / min(w, h)
    nw, nh = max(p.size, round(w * s)), max(p.size, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - p.size) // 2, (nh - p.size) // 2
    return np.asarray(img.crop((left, top, left + p.size, top + p.size))).transpose(2, 0, 1)


def test_exact_decoding_ignores_the_draft_and_matches_plain_pillow_bit_for_bit():
    data, p = _photo_jpeg(), Preprocess()
    assert p.decode == "exact" and p.draft_to is None
    img = load_image(data, reduce_to=p.draft_to)
    assert img.size == (1200, 900) and img.info[JPEG_INFO] == 1
    assert np.array_equal(p.eval_uint8(img).numpy(), _reference_eval_pixels(data, p))


def test_fast_decoding_drafts_a_large_jpeg_and_stays_within_the_pixel_tolerance():
    data, exact, fast = _photo_jpeg(), Preprocess(), Preprocess(decode="fast")
    img = load_image(data, reduce_to=fast.draft_to)
    assert img.size == (600, 450) and img.info[JPEG_INFO] == 2  # 1/2 scale still covers 256 px
    a = exact.eval_uint8(load_image(data)).numpy().astype(np.int16)
    f = fast.eval_uint8(img).numpy().astype(np.int16)
    diff = np.abs(a - f)
    assert f.shape == a.shape and diff.any()  # it really decoded other pixels
    assert diff.mean() < MEAN_LEVELS and np.percentile(diff, 99) <= P99_LEVELS, (diff.mean(), np.percentile(diff, 99))


def test_fast_decoding_never_drafts_below_the_resize_target():
    """Pillow picks the scale from both sides: the shorter side must stay >= resize_to (256)."""
    fast = Preprocess(decode="fast")
    for size, scale in (((400, 300), 1), ((520, 513), 2), ((2100, 1030), 4), ((4200, 2100), 8)):
        img = load_image(encode(Image.new("RGB", size, (90, 120, 200)), "JPEG"), reduce_to=fast.draft_to)
        assert img.info[JPEG_INFO] == scale and min(img.size) >= fast.resize_to, (size, img.size)


@pytest.mark.parametrize("mode, exif", [("L", None), ("CMYK", None), ("RGB", 6)])
def test_fast_decoding_drafts_grey_cmyk_and_rotated_jpegs_to_upright_rgb(mode, exif):
    """The mark survives the conversion to RGB (so reducing_gap applies), and EXIF rotation follows the draft."""
    img, kw = Image.new(mode, (1200, 800)), {}
    if exif:
        ex = img.getexif()
        ex[0x0112] = exif  # rotate 90 degrees: upright it is 800 x 1200
        kw["exif"] = ex
    out = load_image(encode(img, "JPEG", **kw), reduce_to=Preprocess(decode="fast").draft_to)
    assert out.mode == "RGB" and out.info[JPEG_INFO] == 2
    assert out.size == ((400, 600) if exif else (600, 400))


def test_fast_decoding_leaves_png_pixels_bit_identical():
    img = Image.open(DATA / "coffee.jpg").convert("RGB").resize((1400, 1100))
    data = encode(img, "PNG")
    exact, fast = Preprocess(), Preprocess(decode="fast")
    a = exact.eval_uint8(load_image(data, reduce_to=exact.draft_to))
    f = fast.eval_uint8(load_image(data, reduce_to=fast.draft_to))
    assert torch.equal(a, f)


def test_decode_enters_the_key_only_when_fast():
    assert Preprocess(decode="exact").key() == Preprocess().key()
    assert Preprocess(decode="fast").key() == Preprocess().key() + ',decode="fast"'
    with pytest.raises(ValueError, match="unknown decode 'quick'; use one of exact, fast"):
        Preprocess(decode="quick")


def test_a_fast_spec_changes_the_tower_fingerprint_and_rebuilds_from_its_own_spec():
    spec = json.loads(tiny_tower_arg())
    exact, fast = build_image_tower(spec), build_image_tower({**spec, "decode": "fast"})
    assert fast.preprocess.decode == "fast" and fast.spec["decode"] == "fast"
    assert fast.fingerprint() != exact.fingerprint()
    assert build_image_tower(fast.spec).fingerprint() == fast.fingerprint()
    assert build_image_tower({**spec, "decode": "exact"}).fingerprint() == exact.fingerprint()
    with pytest.raises(ValueError, match="unknown decode"):
        build_image_tower({**spec, "decode": "quick"})


def test_a_training_config_names_the_decoding_of_its_tower_and_a_bad_one_is_one_line():
    from littune.config import CHOICES, LiTConfig
    from littune.errors import ConfigError
    from littune.data.preprocess import DECODES

    assert CHOICES["model.image_tower.decode"] == DECODES
    LiTConfig(image_tower={"type": "efficientnet-lite", "name": "efficientnet-lite0", "decode": "fast"}).validate()
    with pytest.raises(ConfigError, match=r"^model.image_tower.decode: 'quick' is not one of exact, fast$"):
        LiTConfig(image_tower={"type": "efficientnet-lite", "name": "efficientnet-lite0", "decode": "quick"}).validate()


def test_embed_fast_decode_writes_a_cache_keyed_as_fast_with_close_features(tmp_path, one_thread):
    """The CLI flag: the manifest's fingerprint and preprocess say fast; features stay close to exact."""
    src = tmp_path / "data"
    src.mkdir()
    rows = ["image,caption"]
    for i, (name, size) in enumerate([("chelsea.jpg", (1100, 800)), ("coffee.jpg", (900, 1300)),
                                      ("chelsea.jpg", (640, 520)), ("coffee.jpg", (300, 200))]):
        (src / f"{i}.jpg").write_bytes(_photo_jpeg(size, name))
        rows.append(f"{i}.jpg,photo {i}")
    (src / "pairs.csv").write_text("\n".join(rows) + "\n")
    caches = {}
    for flag in ([], ["--fast-decode"]):
        out = tmp_path / ("fast" if flag else "exact")
        assert main(["embed", str(src / "pairs.csv"), "--out", str(out), "--tower", tiny_tower_arg(),
                     "--workers", "0", "--runtime", "torch", "-q", *flag]) == 0
        caches["fast" if flag else "exact"] = EmbeddingCache.open(out)
    exact, fast = caches["exact"], caches["fast"]
    assert exact.manifest["preprocess"]["decode"] == "exact" and fast.manifest["preprocess"]["decode"] == "fast"
    assert fast.manifest["tower_spec"]["decode"] == "fast"
    assert fast.tower_fingerprint != exact.tower_fingerprint
    assert fast.tower_fingerprint == build_image_tower(fast.manifest["tower_spec"]).fingerprint()
    a, f = (torch.from_numpy(np.asarray(c.features(np.arange(4)), dtype=np.float32)).reshape(4, -1)
            for c in (exact, fast))
    cos = torch.nn.functional.cosine_similarity(a, f, dim=-1)
    assert not torch.equal(a, f) and bool((cos > 0.99).all()), cos


def test_fast_efficientnet_fingerprint_from_spec_equals_the_built_towers_and_features_stay_close():
    pytest.importorskip("efficientnet_lite_pytorch")
    from littune.towers.fingerprint import fingerprint_from_spec

    spec = {"type": "efficientnet-lite", "name": "efficientnet-lite0", "decode": "fast"}
    fast, exact = build_image_tower(spec).eval(), build_image_tower("efficientnet-lite0").eval()
    assert fingerprint_from_spec(spec) == fast.fingerprint() != exact.fingerprint()
    data = [_photo_jpeg((1200, 900), "chelsea.jpg"), _photo_jpeg((1000, 1400), "coffee.jpg")]
    with torch.no_grad():
        a = exact(torch.stack([exact.preprocess.eval(load_image(d)) for d in data]))
        f = fast(torch.stack([fast.preprocess.eval(load_image(d, reduce_to=fast.preprocess.draft_to)) for d in data]))
    cos = torch.nn.functional.cosine_similarity(a, f, dim=-1)
    assert bool((cos > 0.998).all()), cos  # measured 0.9997 and 0.9993


def test_training_takes_a_fast_cache_only_from_a_config_whose_tower_says_fast(tmp_path, one_thread):
    """The fingerprint keeps caches apart: the default tower refuses a fast cache (stale, one message);
    the same tower with decode fast trains from it, and the saved model decodes fast too."""
    from test_trainer import TINY, make_source

    from littune import load
    from littune.config import load_config
    from littune.errors import StaleCacheError
    from littune.train.trainer import Trainer

    src, cache = make_source(tmp_path / "data", per_class=1), tmp_path / "cache"
    assert main(["embed", str(src), "--out", str(cache), "--tower", tiny_tower_arg(), "--workers", "0", "-q",
                 "--fast-decode"]) == 0
    image = next(o for o in TINY if o.startswith("model.image_tower="))
    fast_tower = image[:-1] + ", decode: fast}"
    common = [f"data.cache={cache}", "steps=2", "data.batch_size=8"]
    with pytest.raises(StaleCacheError, match="image tower fingerprint"):
        Trainer(load_config(overrides=TINY + [f"run_dir={tmp_path / 'exact'}", *common])).run()
    out = Trainer(load_config(overrides=TINY + [fast_tower, f"run_dir={tmp_path / 'fast'}", *common])).run()
    model = load(out)
    assert model.preprocess.decode == "fast" and model.image_fingerprint == EmbeddingCache.open(cache).tower_fingerprint
