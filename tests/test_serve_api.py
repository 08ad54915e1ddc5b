"""The web app's JSON API (littune.serve.app) on a tiny model and a tiny index, through FastAPI's TestClient.

Good requests give what the model and the index give; every bad kind (oversize, not an image, bad
labels, k out of range, unknown template set, path traversal in any parameter) gets a 4xx with a
JSON message, never a file's content, and the server keeps answering afterwards.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import CAPTIONS, TINY_TEXT  # noqa: E402
from littune.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"
LABELS = ["cat", "cup of coffee", "red square", "blue sky", "dog"]
LOCAL = "http://localhost:8000"  # the app answers only loopback host names (TestClient's own is "testserver")


def tiny_lit():
    """A tiny LiT model (the conftest towers), built outside a function-scoped fixture."""
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    cfg = LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16)
    return LiTModel.from_config(cfg, captions=CAPTIONS)


def photo_collection(root: Path) -> Path:
    """Six coloured squares and the two bundled photos, in two sub-folders."""
    (root / "shapes").mkdir(parents=True, exist_ok=True)
    (root / "photos").mkdir(exist_ok=True)
    colours = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 220, 20), (20, 20, 20), (250, 150, 200)]
    for i, rgb in enumerate(colours):
        arr = np.full((64, 64, 3), 235, np.uint8)
        arr[10 + 3 * i:50, 12:52] = rgb
        Image.fromarray(arr).save(root / "shapes" / f"shape{i}.png")
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(DATA / name, root / "photos" / name)
    return root


def build_served(tmp: Path):
    """(model saved and loaded from ``tmp/model``, index over :func:`photo_collection`) for the app."""
    from littune import LiTModel
    from littune.search import build_index

    tiny_lit().save_pretrained(tmp / "model")
    model = LiTModel.from_pretrained(tmp / "model")
    index = build_index(model, str(photo_collection(tmp / "photos")), tmp / "idx", model_dir=tmp / "model",
                        progress=False, workers=0)
    return model, index


def jpeg_bytes(size=(96, 80), colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    return build_served(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(served):
    model, index = served
    app = create_app(model, index, model_name="tiny", max_upload_bytes=200_000, max_pixels=1_000_000)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def bare_client(served):
    with TestClient(create_app(served[0]), base_url=LOCAL) as c:
        yield c


def post_image(client, data: bytes, labels: str = ", ".join(LABELS), templates: str | None = None,
               name: str = "x.jpg", ctype: str = "image/jpeg"):
    form = {"labels": labels} if templates is None else {"labels": labels, "templates": templates}
    return client.post("/api/classify", files={"image": (name, data, ctype)}, data=form)


def assert_healthy(client):
    r = client.get("/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- good requests -------------------------------------------------------------------------------
def test_health_and_openapi(client, bare_client, served):
    h = client.get("/api/health").json()
    assert h["model"]["name"] == "tiny" and h["model"]["setting"] == "Lu" and h["model"]["embed_dim"] == 16
    assert h["index"] == {"loaded": True, "size": len(served[1])}
    assert "short" in h["template_sets"] and h["limits"]["max_k"] == 100
    assert bare_client.get("/api/health").json()["index"] == {"loaded": False, "size": 0}
    schema = client.get("/openapi.json").json()
    assert {"/api/classify", "/api/search", "/api/image/{image_id}", "/api/health"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 404  # Swagger UI loads from a CDN: not served (test_serve_guard)
    page = client.get("/")
    assert page.status_code == 200 and "littune" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_classify_matches_the_model(client, served):
    model = served[0]
    data = (DATA / "chelsea.jpg").read_bytes()
    r = post_image(client, data, templates="imagenet7")
    assert r.status_code == 200, r.text
    out = r.json()
    probs = [x["probability"] for x in out["labels"]]
    assert sorted(x["label"] for x in out["labels"]) == sorted(LABELS)
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert out["templates"] == "imagenet7" and out["image"] == {"width": 451, "height": 300}
    expected = model.classify(Image.open(io.BytesIO(data)), LABELS, templates="imagenet7")[0]
    for item in out["labels"]:
        assert item["probability"] == pytest.approx(float(expected[LABELS.index(item["label"])]), abs=1e-5)
    # default templates ("short"), labels separated by new lines as well as commas, spaces trimmed
    r = post_image(client, jpeg_bytes(), labels=" cat ,dog\nbird ")
    assert r.status_code == 200 and {x["label"] for x in r.json()["labels"]} == {"cat", "dog", "bird"}
    assert r.json()["templates"] == "short"


def test_a_fast_decoding_model_serves_the_pixels_it_was_embedded_with(tmp_path):
    # decode="fast": a JPEG is drafted at a DCT scale towards the resize size, as littune embed does
    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    torch.manual_seed(0)
    cfg = LiTConfig(setting="Lu", image_tower={**SPEC, "decode": "fast"}, text_tower=dict(TINY_TEXT), embed_dim=16)
    model = LiTModel.from_config(cfg, captions=CAPTIONS)
    assert model.preprocess.draft_to is not None
    with TestClient(create_app(model), base_url=LOCAL) as c:
        r = post_image(c, (DATA / "chelsea.jpg").read_bytes(), templates="imagenet7")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["image"] == {"width": 451, "height": 300}  # the file's size, not the drafted one
    got = torch.tensor([x["probability"] for x in sorted(out["labels"], key=lambda x: LABELS.index(x["label"]))])
    drafted = model.classify(DATA / "chelsea.jpg", LABELS, templates="imagenet7")[0]  # the file: drafted
    whole = model.classify(Image.open(DATA / "chelsea.jpg"), LABELS, templates="imagenet7")[0]  # decoded whole
    assert torch.allclose(got, drafted, atol=1e-6) and not torch.allclose(got, whole, atol=1e-6)


def test_text_and_image_search(client, served):
    model, index = served
    r = client.get("/api/search", params={"q": "a red square", "k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    want = index.search_text(model, "a red square", k=5)[0]
    assert [h["id"] for h in hits] == [h.index for h in want]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["score"] == pytest.approx(want[0].score, abs=1e-5) and hits[0]["url"] == f"/api/image/{want[0].index}"
    assert "/" not in hits[0]["url"][len("/api/image/"):] and all(not h["key"].startswith("/") for h in hits)
    # by image id: the image finds itself first
    r = client.get("/api/search", params={"image_id": 3, "k": 8})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert hits[0]["id"] == 3 and hits[0]["score"] == pytest.approx(1.0, abs=3e-3) and len(hits) == 8
    assert r.json()["query"]["key"] == index.keys[3]
    # k larger than the index: all of it
    assert len(client.get("/api/search", params={"q": "cat", "k": 100}).json()["hits"]) == len(index)


def test_image_by_row_id(client, served):
    index = served[1]
    i = index.keys.index(next(k for k in index.keys if k.endswith("chelsea.jpg")))
    r = client.get(f"/api/image/{i}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 384 and img.size[0] > img.size[1]
    assert client.get(f"/api/image/{len(index)}").status_code == 404
    assert client.get("/api/image/-1").status_code == 404


# (shard, stem, colour, the key the source gives it): the second "s1" is another image, keyed by its shard
SHARD_IMAGES = [("a.tar.gz", "s0", (220, 30, 30), "s0"), ("a.tar.gz", "s1", (30, 160, 40), "s1"),
                ("b.tar", "s1", (30, 60, 220), "b.tar/s1"), ("b.tar", "s2", (240, 220, 20), "s2")]


def tar_shards(root: Path) -> Path:
    """Two webdataset shards: ``a.tar.gz`` (gzip-compressed) and ``b.tar``, both holding stem ``s1``."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    for shard in ("a.tar.gz", "b.tar"):
        with tarfile.open(root / shard, "w:gz" if shard.endswith(".gz") else "w") as tf:
            for _, stem, rgb, _ in (x for x in SHARD_IMAGES if x[0] == shard):
                for member, data in ((f"{stem}.png", _png(rgb)), (f"{stem}.txt", f"a {stem} square".encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _preview_colour(client, i: int) -> tuple[int, ...]:
    r = client.get(f"/api/image/{i}")
    assert r.status_code == 200, (i, r.text)
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and img.size == (64, 48)
    return tuple(int(c) for c in np.asarray(img.convert("RGB"), np.float32).reshape(-1, 3).mean(0).round())


def test_previews_from_compressed_shards_and_repeated_stems(served, tmp_path):
    from littune.search import build_index

    model = served[0]
    index = build_index(model, str(tar_shards(tmp_path / "shards")), tmp_path / "idx", progress=False, workers=0)
    assert sorted(index.keys) == sorted(x[3] for x in SHARD_IMAGES)
    with TestClient(create_app(model, index), base_url=LOCAL) as c:
        shown = [_preview_colour(c, i) for i in range(len(index))]
    # each row's preview is that row's own image: the colour its shard and stem were given
    want = {key: rgb for _, _, rgb, key in SHARD_IMAGES}
    for i, key in enumerate(index.keys):
        assert max(abs(a - b) for a, b in zip(shown[i], want[key])) <= 6, (key, index.where[i], shown[i])


def test_previews_of_an_index_written_before_source_records(served, tmp_path):
    """Indexes from before the source spec was recorded (keys and paths only) still show their images."""
    import json

    from littune.search import SearchIndex, build_index

    model = served[0]
    root = tmp_path / "photos"
    (root / "x").mkdir(parents=True)
    for n, rgb in enumerate(((220, 30, 30), (30, 60, 220))):
        Image.new("RGB", (64, 48), rgb).save(root / "x" / f"p{n}.png")
    build_index(model, str(root), tmp_path / "idx", progress=False, workers=0)
    items = json.loads((tmp_path / "idx" / "items.json").read_text())
    (tmp_path / "idx" / "items.json").write_text(json.dumps({"keys": items["keys"], "where": items["where"]}))
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["source"] = {k: meta["source"][k] for k in ("describe", "fingerprint")}
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    old = SearchIndex.open(tmp_path / "idx")
    with TestClient(create_app(model, old), base_url=LOCAL) as c:
        colours = [_preview_colour(c, i) for i in range(len(old))]
    assert [max(abs(a - b) for a, b in zip(col, want)) <= 6 for col, want in
            zip(colours, ((220, 30, 30), (30, 60, 220)))] == [True, True]


# -- bad requests ----------------------------------------------------------------------------------
def test_oversize_upload_and_too_many_pixels(client):
    for n in (210_000, 300_000, 5_000_000):  # over the file limit; over the whole body's limit
        r = post_image(client, b"\xff\xd8\xff" + b"\0" * n)
        assert r.status_code == 413 and r.json()["detail"] == "upload too large: images up to 195 KB are accepted"
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, format="PNG")  # 1.2 MP > the 1 MP limit, a few KB of PNG
    r = post_image(client, big.getvalue(), name="big.png", ctype="image/png")
    assert r.status_code == 413 and "too many pixels" in r.json()["detail"]
    assert_healthy(client)


def test_chunked_oversize_body_is_refused(client):
    def body():  # a well-formed multipart start, then an endless file part, with no content-length
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/api/classify", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert_healthy(client)


def test_not_an_image(client):
    r = post_image(client, b"just some text, not a picture\n" * 10, name="note.png", ctype="image/png")
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = post_image(client, jpeg_bytes()[:200], name="cut.jpg")  # a truncated JPEG
    assert r.status_code == 400 and r.json()["detail"].startswith(("truncated", "corrupt"))
    r = post_image(client, b"", name="empty.jpg")
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    r = client.post("/api/classify", data={"labels": "cat"})  # no file at all
    assert r.status_code == 422 and "image" in r.json()["detail"]
    assert_healthy(client)


@pytest.mark.parametrize("labels, words", [
    ("", "no labels"), (" , ,\n", "no labels"), (",".join(f"l{i}" for i in range(101)), "too many labels"),
    ("cat, " + "x" * 201, "characters long"), ("cat, dog, cat", "given twice")])
def test_bad_labels(client, labels, words):
    r = post_image(client, jpeg_bytes(), labels=labels)
    assert r.status_code in (400, 422) and words in r.json()["detail"]


def test_unknown_template_set_and_template_paths(client, tmp_path):
    for name in ("nosuchset", "../../etc/passwd", "/etc/passwd", str(tmp_path)):
        r = post_image(client, jpeg_bytes(), templates=name)
        assert r.status_code == 400 and "unknown template set" in r.json()["detail"], name
    assert_healthy(client)


@pytest.mark.parametrize("k", [0, -3, 101, 1000, "many"])
def test_k_out_of_range(client, k):
    r = client.get("/api/search", params={"q": "cat", "k": k})
    assert r.status_code == 422 and r.json()["detail"].startswith("k:")


def test_bad_search_queries(client, bare_client):
    assert client.get("/api/search", params={"k": 3}).status_code == 400  # neither q nor image_id
    assert client.get("/api/search", params={"q": "cat", "image_id": 1}).status_code == 400  # both
    assert client.get("/api/search", params={"q": "   "}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * 501}).status_code == 422
    assert client.get("/api/search", params={"image_id": 999}).status_code == 404
    r = bare_client.get("/api/search", params={"q": "cat"})
    assert r.status_code == 404 and "no index loaded" in r.json()["detail"] and "--index" in r.json()["detail"]
    assert bare_client.get("/api/image/0").status_code == 404
    assert_healthy(client)


TRAVERSALS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
              "....//....//etc/passwd", "..\\..\\etc\\passwd"]


@pytest.mark.parametrize("evil", TRAVERSALS)
def test_path_traversal_never_reads_files(client, evil):
    secret = Path("/etc/passwd").read_text() if Path("/etc/passwd").is_file() else "root:x:0:0"
    responses = [
        client.get(f"/api/search?image_id={evil}"),
        client.get(f"/api/image/{evil}"),
        client.get(f"/static/{evil}"),
        client.get(f"/{evil}"),
        client.get(f"/api/search?image_id=1&q={evil}"),
    ]
    for r in responses:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code)
        assert "root:" not in r.text and secret[:30] not in r.text
    # a text query is just text: searching for it is fine, and answers with index rows only
    r = client.get("/api/search", params={"q": evil, "k": 3})
    assert r.status_code == 200 and all(isinstance(h["id"], int) for h in r.json()["hits"])
    assert "root:" not in r.text
    assert_healthy(client)


def test_missing_extra_gives_a_clear_error(monkeypatch, capsys):
    import sys

    from littune.cli import main
    from littune.errors import LittuneError
    from littune.serve.app import require_fastapi

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    with pytest.raises(LittuneError, match=r"pip install 'littune\[serve\]'"):
        require_fastapi()
    assert main(["serve", "--model", "nowhere"]) == 2
    assert "pip install 'littune[serve]'" in capsys.readouterr().err
