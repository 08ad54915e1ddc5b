"""Exact chunked top-k search against a full sort; index build / open / search; the FAISS backend."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from littune.errors import LittuneError, StaleCacheError
from littune.search import SearchIndex, build_index, embedding_fingerprint, topk_search


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(q, db, k):
    sim = q.astype(np.float64) @ db.astype(np.float64).T
    idx = [sorted(range(db.shape[0]), key=lambda j: (-sim[r, j], j))[:k] for r in range(q.shape[0])]
    return np.take_along_axis(sim, np.array(idx), 1), np.array(idx)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("chunk", [7, 64, 100_000])
def test_topk_matches_a_full_sort(dtype, chunk):
    rng = np.random.default_rng(0)
    db = rng.standard_normal((300, 8)).astype(dtype)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    v, i = topk_search(q, db, k=10, chunk_rows=chunk)
    rv, ri = _reference(q, db.astype(np.float32), 10)
    assert i.dtype == torch.int64 and v.dtype == torch.float32 and v.shape == (5, 10)
    assert (i.numpy() == ri).all()
    assert np.allclose(v.numpy(), rv, atol=1e-5)


def test_topk_ties_sorted_by_index_and_edge_cases():
    db = np.array([[1, 0], [0, 1], [1, 0], [0.5, 0], [1, 0]], dtype=np.float16)
    v, i = topk_search(np.array([1, 0], dtype=np.float32), db, k=4, chunk_rows=2)  # a 1-D query
    assert i.tolist() == [[0, 2, 4, 3]] and v.tolist() == [[1, 1, 1, 0.5]]
    v, i = topk_search(np.array([[1, 0]]), db, k=50)  # k capped at N
    assert i.shape == (1, 5)
    v, i = topk_search(torch.tensor([[0.0, 1.0]]), torch.from_numpy(db), k=1)  # tensor database
    assert i.tolist() == [[1]]
    with pytest.raises(LittuneError, match="queries are 3-d but the index holds 2-d"):
        topk_search(np.ones((1, 3)), db)
    with pytest.raises(LittuneError, match="k must be at least 1"):
        topk_search(np.ones((1, 2)), db, k=0)


def _collection(root, n=8):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        arr = np.zeros((40, 40, 3), np.uint8)
        arr[..., i % 3] = 60 + 20 * i
        arr[5 + i:20 + i, 5:30] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(sub / f"img{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_build_open_and_search(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    root = _collection(tmp_path / "photos")
    index = build_index(model, str(root), tmp_path / "idx", model_dir=tmp_path / "model", progress=False, workers=0)
    assert len(index) == 8 and index.dim == 16
    assert index.embeddings.dtype == np.float16
    assert np.allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["count"] == 8 and meta["skipped"] == 1 and meta["model"]["fingerprint"] == embedding_fingerprint(model)
    assert "broken.jpg" in (tmp_path / "idx" / "skipped.tsv").read_text()
    # embeddings are what the model gives for the same files
    ref = model.encode_images(index.where)
    assert torch.allclose(torch.from_numpy(index.embeddings.astype(np.float32)), ref, atol=2e-3)
    # image query: each image finds itself first
    again = SearchIndex.open(tmp_path / "idx")
    hits = again.search_image(model, [index.where[3], index.where[6]], k=3)
    assert hits[0][0].where == index.where[3] and hits[1][0].where == index.where[6]
    assert hits[0][0].score == pytest.approx(1.0, abs=2e-3) and hits[0][0].rank == 1
    assert [h.rank for h in hits[0]] == [1, 2, 3]
    # text query: the order is the order of the cosine similarities
    text_hits = again.search_text(model, "a red square", k=8)[0]
    t = model.encode_texts(["a red square"])[0].numpy()
    sims = index.embeddings.astype(np.float32) @ t
    assert [h.index for h in text_hits] == sorted(range(8), key=lambda j: (-sims[j], j))
    # the model recorded in the index is found (it embeds queries as the model did) and checked
    loaded = again.load_model()
    assert embedding_fingerprint(loaded) == meta["model"]["fingerprint"]
    assert torch.allclose(loaded.encode_texts(["a red square"]), model.encode_texts(["a red square"]), atol=1e-6)
    other = tiny_model()
    with torch.no_grad():
        other.image_head.weight.add_(0.1)
    other.save_pretrained(tmp_path / "model")  # the recorded directory now holds another image head
    with pytest.raises(StaleCacheError, match="rebuild the index"):
        again.load_model()
    with pytest.raises(LittuneError, match="already holds an index"):
        build_index(model, str(root), tmp_path / "idx", progress=False, workers=0)


def test_open_image_reopens_each_row_from_its_source_records_in_any_directory(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    _collection(tmp_path / "photos", n=4)
    monkeypatch.chdir(tmp_path)
    build_index(model, "photos", "idx", progress=False, workers=0)  # relative paths
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    index = SearchIndex.open(tmp_path / "idx")
    assert index.meta["source"]["spec"] == {"type": "folder", "path": str(tmp_path / "photos")}
    for i, key in enumerate(index.keys):
        want = np.asarray(Image.open(tmp_path / "photos" / key).convert("RGB"))
        assert (np.asarray(index.open_image(i)) == want).all(), key
    (tmp_path / "photos" / index.keys[0]).unlink()  # the source no longer holds row 0
    with pytest.raises(LittuneError, match="no longer in the source"):
        SearchIndex.open(tmp_path / "idx").open_image(0)


def test_rebuild_with_a_new_head_reuses_the_tower_features(tiny_model, tmp_path):
    pytest.importorskip("littune.cache")
    model = tiny_model()
    root = _collection(tmp_path / "photos", n=4)
    first = build_index(model, str(root), tmp_path / "idx", progress=False, workers=0)
    manifest = tmp_path / "idx" / "features" / "manifest.json"
    assert first.meta["features"] == str(tmp_path / "idx" / "features") and manifest.is_file()
    stamp = manifest.stat().st_mtime_ns
    with torch.no_grad():
        model.image_head.weight.mul_(-1)  # a retrained head, the same locked tower
        model.image_head.bias.mul_(-1)
    second = build_index(model, str(root), tmp_path / "idx", progress=False, workers=0, overwrite=True)
    assert manifest.stat().st_mtime_ns == stamp  # the tower did not run again
    assert second.meta["model"]["fingerprint"] != first.meta["model"]["fingerprint"]
    assert np.allclose(second.embeddings.astype(np.float32), -np.asarray(first.embeddings, dtype=np.float32),
                       atol=1e-3)


def test_index_refuses_another_model_and_damaged_dirs(tiny_model, tmp_path):
    model = tiny_model()
    root = _collection(tmp_path / "photos", n=3)
    index = build_index(model, str(root), tmp_path / "idx", progress=False, workers=0)
    other = tiny_model()
    with torch.no_grad():
        other.image_head.weight.add_(0.1)
    with pytest.raises(StaleCacheError, match="rebuild the index"):
        index.check_model(other)
    with pytest.raises(LittuneError, match="does not record its model"):
        index.load_model()
    with pytest.raises(LittuneError, match="index not found"):
        SearchIndex.open(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(LittuneError, match="not a littune index"):
        SearchIndex.open(tmp_path / "half")
    (tmp_path / "idx" / "items.json").write_text(json.dumps({"keys": ["x"], "where": ["x"]}))
    with pytest.raises(LittuneError, match="inconsistent"):
        SearchIndex.open(tmp_path / "idx")
    with pytest.raises(LittuneError, match="no FAISS index"):
        index.backend("faiss")


def test_faiss_backend(tiny_model, tmp_path):
    pytest.importorskip("faiss")
    model = tiny_model()
    root = _collection(tmp_path / "photos")
    index = build_index(model, str(root), tmp_path / "idx", progress=False, workers=0, faiss_factory="Flat")
    assert index.backend("auto") == "faiss"
    q = model.encode_texts(["a blue stripe", "a cat"])
    fv, fi = index.search(q, k=5, backend="faiss")
    ev, ei = index.search(q, k=5, backend="exact")
    assert (fi == ei).all() and torch.allclose(fv, ev, atol=1e-5)
    ivf = build_index(model, str(root), tmp_path / "ivf", progress=False, workers=0, faiss_factory="IVF2,Flat")
    iv, ii = ivf.search(q, k=5, backend="faiss", nprobe=2)  # probing every list: exact
    assert (ii == ei).all() and torch.allclose(iv, ev, atol=1e-5)
    with pytest.raises(LittuneError, match="FAISS cannot build"):
        build_index(model, str(root), tmp_path / "idx2", progress=False, workers=0, faiss_factory="NoSuchIndex")


def test_index_uses_the_embed_cache_of_a_saved_hf_models_tower(tmp_path):
    """A saved model rebuilds its hf: tower from model/image_tower (another name, the same weights) and keeps
    the fingerprint it was trained on: a `littune embed --tower hf:DIR` cache of the collection matches it
    and is used as it is (it was refused as 'started with other settings' before)."""
    from transformers import ViTConfig, ViTModel

    from conftest import CAPTIONS, TINY_TEXT
    from littune import LiTConfig, LiTModel
    from littune.cache import embed_source
    from littune.towers.image import build_image_tower

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=48), add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text('{"size": {"height": 32, "width": 32}}')
    spec = f"hf:{tmp_path / 'vit'}#mean"
    LiTModel.from_config(LiTConfig(setting="Lu", image_tower=spec, text_tower=dict(TINY_TEXT), embed_dim=16),
                         captions=CAPTIONS).save_pretrained(tmp_path / "model")
    model = LiTModel.from_pretrained(tmp_path / "model")
    root = _collection(tmp_path / "photos", n=4)
    cache = embed_source(str(root), build_image_tower(spec), tmp_path / "cache", workers=0, progress=False)
    assert cache.tower_fingerprint == model.image_fingerprint != model.image_tower.fingerprint()
    stamp = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    index = build_index(model, str(root), tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, workers=0)
    assert len(index) == 4 and (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == stamp
    plain = build_index(model, str(root), tmp_path / "plain", progress=False, workers=0)
    assert np.allclose(np.asarray(index.embeddings, np.float32), np.asarray(plain.embeddings, np.float32), atol=2e-3)
