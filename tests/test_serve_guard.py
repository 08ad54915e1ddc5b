"""``littune serve`` answers only its own host names and its own page (DNS rebinding, cross-site POSTs).

Through FastAPI's TestClient on the app :func:`littune.serve.app.create_app` makes, and through the
command line (``littune serve`` with uvicorn.run replaced by a catcher of the app it would serve).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402

from littune.cli import main  # noqa: E402
from littune.serve.app import create_app  # noqa: E402
from test_serve_api import build_served, jpeg_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LOCAL = "http://localhost:8000"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("guard")
    return (*build_served(tmp), tmp)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served[0], served[1]), base_url=LOCAL) as c:
        yield c


def _classify(client, headers=None):
    return client.post("/api/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                       data={"labels": "cat, dog"}, headers=headers or {})


def _one_line(r) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return detail


@pytest.mark.parametrize("path", ["/", "/api/health", "/api/search?q=cat", "/api/image/0", "/openapi.json",
                                  "/static/app.js"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example",
                                  "[::1", ""])
def test_a_foreign_host_gets_400_on_every_path(client, path, host):
    r = client.get(path, headers={"host": host})
    assert r.status_code == 400
    assert "--allow-host" in _one_line(r)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:9", "127.0.0.1", "127.0.0.1:1234",
                                  "[::1]", "[::1]:8000", "[0:0:0:0:0:0:0:1]:80"])
def test_loopback_host_names_with_any_port_are_answered(client, host):
    r = client.get("/api/health", headers={"host": host})
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("headers", [
    {"origin": "http://evil.example"},
    {"origin": "http://localhost:3000"},  # another local site
    {"origin": "null"},  # a sandboxed frame or a file:// page
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},
])
def test_a_cross_site_post_gets_403(client, headers):
    r = _classify(client, headers)
    assert r.status_code == 403
    assert "cross-site request refused" in _one_line(r)


def test_a_cross_site_api_get_gets_403_and_the_page_still_opens_from_a_link(client):
    assert client.get("/api/search?q=cat", headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/api/image/0", headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert client.get("/", headers={"sec-fetch-site": "cross-site"}).status_code == 200  # a link to the app


@pytest.mark.parametrize("headers", [{}, {"origin": LOCAL}, {"origin": LOCAL, "sec-fetch-site": "same-origin"},
                                     {"sec-fetch-site": "none"}])
def test_a_same_origin_post_is_answered(client, headers):
    r = _classify(client, headers)
    assert r.status_code == 200, r.text
    assert {x["label"] for x in r.json()["labels"]} == {"cat", "dog"}


def test_allowed_hosts_let_a_named_host_in(served):
    model, index, _ = served
    with TestClient(create_app(model, index, allowed_hosts=["localhost", "photos.lan", "::1"]),
                    base_url="http://photos.lan:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "[::1]:8000"}).status_code == 200
        assert c.get("/api/health", headers={"host": "127.0.0.1"}).status_code == 400  # not in this list
        assert _classify(c, {"origin": "http://photos.lan:8000"}).status_code == 200
        assert _classify(c, {"origin": "http://localhost:8000"}).status_code == 403  # another origin


# -- the command line -----------------------------------------------------------------------------
@pytest.fixture
def started(monkeypatch):
    """What `littune serve` hands uvicorn (nothing listens: no port is bound, the server does not run)."""
    import socket

    import uvicorn

    from littune.commands import serve as serve_command

    got = {}

    def run(server, sockets=None):
        got.update(app=server.config.app, host=server.config.host, port=server.config.port)
        for s in sockets or ():
            s.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(serve_command, "listening_socket", lambda host, port: socket.socket())
    return got


def test_serve_allow_host_answers_the_named_host(served, started, capsys):
    tmp = served[2]
    assert main(["serve", "--model", str(tmp / "model"), "--host", "0.0.0.0", "--allow-host", "photos.lan",
                 "--allow-host", "192.168.1.20"]) == 0
    err = capsys.readouterr().err
    assert "photos.lan" in err and "192.168.1.20" in err
    with TestClient(started["app"], base_url="http://photos.lan:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "192.168.1.20:8000"}).status_code == 200
        assert c.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/api/health", headers={"host": "evil.example"}).status_code == 400


def test_serve_on_a_loopback_bind_answers_only_loopback_names(served, started):
    assert main(["serve", "--model", str(served[2] / "model")]) == 0
    assert started["host"] == "127.0.0.1"
    with TestClient(started["app"], base_url="http://127.0.0.1:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "evil.example:8000"}).status_code == 400


def test_serve_on_a_specific_address_answers_that_address(served, started):
    assert main(["serve", "--model", str(served[2] / "model"), "--host", "192.168.1.20"]) == 0
    with TestClient(started["app"], base_url="http://192.168.1.20:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "evil.example"}).status_code == 400


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_serve_on_every_interface_without_allow_host_says_what_is_allowed(served, started, capsys, host):
    assert main(["serve", "--model", str(served[2] / "model"), "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-host" in err and "localhost, 127.0.0.1, [::1]" in err
    assert "app" not in started


@pytest.mark.parametrize("bad", ["http://photos.lan", "photos.lan:8000", "a/b"])
def test_a_malformed_allow_host_is_one_line(served, started, capsys, bad):
    assert main(["serve", "--model", str(served[2] / "model"), "--allow-host", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-host" in err and json.dumps(bad)[1:-1] in err


# -- one request cannot hold the model for long; no page that needs the internet -------------------
def _labels(n: int, chars: int = 12) -> str:
    return ", ".join(f"{i:03d}" + "x" * (chars - 3) for i in range(n))


@pytest.fixture
def text_calls(served, monkeypatch):
    """How many times the served model embeds prompts (zero-shot weights)."""
    model, calls = served[0], []
    real = model.zeroshot_weights
    monkeypatch.setattr(model, "zeroshot_weights", lambda labels, templates: calls.append(len(labels)) or
                        real(labels, templates))
    return calls


def test_too_many_prompts_per_request_is_a_422_before_any_prompt_is_embedded(client, text_calls):
    """100 labels of 200 characters x imagenet's 80 templates = 8,000 prompts (4.0 s under the model lock)."""
    r = client.post("/api/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                    data={"labels": _labels(100, 200), "templates": "imagenet"})
    assert r.status_code == 422
    detail = _one_line(r)
    assert "100 labels x 80 templates (imagenet) = 8,000 prompts" in detail and "at most 2,000" in detail
    assert text_calls == []
    assert client.get("/api/health").json()["limits"]["max_prompts"] == 2000


def test_prompts_up_to_the_limit_are_answered(client, text_calls):
    r = client.post("/api/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                    data={"labels": _labels(25), "templates": "imagenet"})  # 25 x 80 = 2,000
    assert r.status_code == 200, r.text
    assert len(r.json()["labels"]) == 25 and text_calls == [25]


def test_max_prompts_is_set_from_the_command_line(served, started, capsys):
    assert main(["serve", "--model", str(served[2] / "model"), "--max-prompts", "10"]) == 0
    with TestClient(started["app"], base_url=LOCAL) as c:
        assert c.get("/api/health").json()["limits"]["max_prompts"] == 10
        ok = _classify(c)  # 2 labels x short's 6 templates = 12
        assert ok.status_code == 422 and "= 12 prompts, at most 10" in _one_line(ok)
        one = c.post("/api/classify", files={"image": ("x.jpg", jpeg_bytes(), "image/jpeg")},
                     data={"labels": "cat", "templates": "short"})
        assert one.status_code == 200
    assert main(["serve", "--model", str(served[2] / "model"), "--max-prompts", "0"]) == 2
    assert "--max-prompts must be positive" in capsys.readouterr().err


def test_no_api_page_loads_from_a_cdn(client):
    """Swagger UI and ReDoc load their scripts from a CDN (a broken page offline): not served; the
    OpenAPI schema is, and the app's own page names no other host."""
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert "/api/classify" in client.get("/openapi.json").json()["paths"]
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
