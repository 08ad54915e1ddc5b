"""The web app end to end: a real uvicorn server on a free localhost port, driven in headless Chromium.

Debian's chromium and chromium-driver drive the page through Selenium (no browser download; the
network is closed, so background networking is off). Test 1 uploads a photo, types labels and finds
the model's top label ranked first on the page; test 2 searches the index by text, finds the
index's own first hit first, then clicks it to search by that image. A screenshot of each view is
saved under pytest's tmp_path, or under $LITTUNE_TEST_OUT when that is set.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
pytest.importorskip("selenium")

from chromium import headless_chromium  # noqa: E402
from test_serve_api import DATA, LABELS, build_served  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, model, index): the app on a real uvicorn server in a thread, stopped afterwards."""
    import uvicorn

    from littune.serve.app import create_app

    model, index = build_served(tmp_path_factory.mktemp("browser"))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(model, index, model_name="tiny"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, index
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium()


@pytest.fixture
def out_dir(tmp_path) -> Path:
    where = Path(os.environ["LITTUNE_TEST_OUT"]) if os.environ.get("LITTUNE_TEST_OUT") else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    return where


def wait(driver, condition, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def screenshot(driver, path: Path) -> Path:
    driver.save_screenshot(str(path))
    assert path.is_file() and path.stat().st_size > 10_000, path
    with Image.open(path) as img:
        assert img.size[0] >= 800 and len(img.convert("RGB").getcolors(1 << 20) or ()) > 20
    return path


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")


def test_classify_in_the_browser(browser, server, out_dir):
    url, model, _ = server
    open_page(browser, url)
    photo = DATA / "chelsea.jpg"
    browser.find_element("id", "file").send_keys(str(photo.resolve()))
    browser.find_element("id", "labels").send_keys(", ".join(LABELS))
    browser.find_element("id", "classify-btn").click()
    rows = wait(browser, lambda d: d.find_elements("css selector", "#results li.bar-row"))
    shown = [r.get_attribute("data-label") for r in rows]
    probs = model.classify(str(photo), LABELS, templates="short")[0]
    assert sorted(shown) == sorted(LABELS)
    assert shown[0] == LABELS[int(probs.argmax())]
    assert rows[0].find_element("css selector", ".prob").text == f"{100 * float(probs.max()):.1f}%"
    wait(browser, lambda d: d.execute_script("return document.getElementById('preview').complete"))
    screenshot(browser, out_dir / "classify.png")


def test_search_in_the_browser(browser, server, out_dir):
    url, model, index = server
    open_page(browser, url)
    browser.find_element("id", "tab-search").click()
    query = "a cat on a mat"
    browser.find_element("id", "query").send_keys(query)
    browser.find_element("id", "search-btn").click()
    cards = wait(browser, lambda d: d.find_elements("css selector", "#grid .hit"))
    assert browser.find_element("id", "search-caption").text.startswith(f"text→image: “{query}”")
    expected = index.search_text(model, query, k=12)[0]
    assert [int(c.get_attribute("data-id")) for c in cards] == [h.index for h in expected]
    all_loaded = "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
    wait(browser, lambda d: d.execute_script(all_loaded))
    screenshot(browser, out_dir / "search.png")
    # clicking an image searches by that image: it comes first
    target = cards[-1].get_attribute("data-id")
    cards[-1].click()
    wait(browser, lambda d: "image→image: images like" in d.find_element("id", "search-caption").text)
    first = browser.find_element("css selector", "#grid .hit")
    assert first.get_attribute("data-id") == target


WHOLE_THUMBNAILS = """
return [...document.querySelectorAll('#grid .hit')].map(card => {
  const img = card.querySelector('img'), key = card.querySelector('.key');
  return {fit: getComputedStyle(img).objectFit, natural: [img.naturalWidth, img.naturalHeight],
          text: key.textContent, title: key.title, cut: key.scrollWidth > key.clientWidth + 1 ||
          key.scrollHeight > key.clientHeight + 1 || getComputedStyle(key).textOverflow === 'ellipsis'};
});
"""


def test_search_grid_shows_whole_thumbnails_and_whole_names(browser, server, out_dir):
    """The thumbnails are scaled to fit their square (object-fit: contain; a photo is not cropped to a
    square) and every name is shown whole (wrapped), with the name as its title too."""
    url, model, index = server
    open_page(browser, url)
    browser.find_element("id", "tab-search").click()
    browser.find_element("id", "query").send_keys("a photo")
    browser.find_element("id", "search-btn").click()
    wait(browser, lambda d: d.find_elements("css selector", "#grid .hit"))
    all_loaded = "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
    wait(browser, lambda d: d.execute_script(all_loaded))
    cards = browser.execute_script(WHOLE_THUMBNAILS)
    assert len(cards) == 8
    assert any(w != h for w, h in (c["natural"] for c in cards)), "the test needs a thumbnail that is not square"
    for c in cards:
        assert c["fit"] == "contain", c
        assert not c["cut"], f"the name {c['text']!r} is cut"
        assert c["title"] == c["text"] and c["text"].endswith((".png", ".jpg")), c
    screenshot(browser, out_dir / "search-grid.png")
