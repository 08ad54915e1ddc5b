"""`littune serve` from the command line: a busy port is a one-line error at once, before the model is
loaded (it used to print its URL, load the model and fail ~70 s later); a free one serves the app."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from conftest import CAPTIONS, TINY_TEXT  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _serve(*argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "littune", "serve", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from littune import LiTConfig, LiTModel
    from littune.towers.tiny import SPEC

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("serve-port") / "model"
    LiTModel.from_config(LiTConfig(setting="Lu", image_tower=SPEC, text_tower=dict(TINY_TEXT), embed_dim=16),
                         captions=CAPTIONS).save_pretrained(out)
    return out


@pytest.fixture
def busy_port():
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def _one_line_error(proc) -> str:
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("littune serve: error: "), err
    assert "http://" not in out + err  # no URL, as if it were running
    return lines[0]


def test_a_busy_port_is_refused_before_the_model_is_read(busy_port, tmp_path):
    """The model folder does not exist: the port is what is named, so it was checked first."""
    line = _one_line_error(_serve("--model", tmp_path / "no-such-model", "--port", busy_port))
    assert f"127.0.0.1:{busy_port} is in use" in line and "--port" in line


def test_a_busy_port_with_a_real_model_is_one_line_at_once(busy_port, model_dir):
    t0 = time.monotonic()
    line = _one_line_error(_serve("--model", model_dir, "--port", busy_port))
    assert f"127.0.0.1:{busy_port} is in use" in line
    assert time.monotonic() - t0 < 60


def test_an_address_not_of_this_machine_is_one_line(model_dir):
    line = _one_line_error(_serve("--model", model_dir, "--host", "192.0.2.1", "--allow-host", "192.0.2.1",
                                  "--port", 8000))
    assert "cannot listen on 192.0.2.1:8000" in line


def test_serve_answers_on_the_port_it_bound_and_its_url(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve("--model", model_dir, "--port", port)
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert health is not None and health["status"] == "ok", proc.poll()
        assert health["model"]["name"] == "model"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert f"littune serve: http://127.0.0.1:{port}/" in err
