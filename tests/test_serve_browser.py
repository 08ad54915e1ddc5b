"""The web app end to end: a real uvicorn server on a free localhost port, driven in headless Chromium.

Debian's chromium and chromium-driver drive the page through Selenium (no browser download; the
network is closed, so background networking is off). Test 1 uploads a photo, types labels and finds
the model's top label ranked first on the page; test 2 searches the index by text, finds the
index's own first hit first, then clicks it to search by that image. The heat-map tests click a label
(and press Enter on another) or type a text, and read the overlay canvas's pixels back: drawn where the
map lies in the image, each cell the colour of its value, and different for two labels. A screenshot of
each view is saved under pytest's tmp_path, or under $LITTUNE_TEST_OUT when that is set.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
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


def _serve(app):
    """Yield the base URL of ``app`` on a real uvicorn server in a thread, stopped afterwards."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, model, index): the app of a tiny model (a CNN tower: it draws heat maps) and its index."""
    from littune.serve.app import create_app

    model, index = build_served(tmp_path_factory.mktemp("browser"))
    for url in _serve(create_app(model, index, model_name="tiny")):
        yield url, model, index


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


# -- heat maps over the classified image -----------------------------------------------------------
#: the overlay canvas at points given as fractions of the image (arguments[0]), and how it lies over the image
OVERLAY = """
const c = document.getElementById('heat-overlay'), img = document.getElementById('heat-image');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let drawn = 0;
for (let i = 3; i < d.length; i += 4) if (d[i] > 0) drawn++;
const at = ([fx, fy]) => {
  const x = Math.min(c.width - 1, Math.floor(fx * c.width)), y = Math.min(c.height - 1, Math.floor(fy * c.height));
  return Array.from(d.slice(4 * (y * c.width + x), 4 * (y * c.width + x) + 4));
};
const r = (e) => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; };
return {drawn, total: c.width * c.height, points: arguments[0].map(at), canvas: r(c), image: r(img),
        label: c.getAttribute('aria-label'), alt: img.alt, complete: img.complete && img.naturalWidth > 0};
"""


def cell_points(hm) -> list[list[float]]:
    """The centre of each map cell (row by row), as fractions of the image's width and height."""
    (h, w), (left, top, right, bottom), (iw, ih) = hm.shape, hm.crop, hm.image_size
    return [[(left + (c + 0.5) * (right - left) / w) / iw, (top + (r + 0.5) * (bottom - top) / h) / ih]
            for r in range(h) for c in range(w)]


def expected_alpha(values, lo: float, hi: float) -> np.ndarray:
    """heatmap.js's transparency of a cell of value ``values`` on the scale ``lo..hi``."""
    return np.round(255 * (0.2 + 0.65 * np.clip((np.asarray(values) - lo) / (hi - lo), 0, 1)))


def overlay(driver, hm) -> dict:
    """The overlay's pixels at each cell centre of ``hm`` and at four points outside the map, with its layout."""
    (left, top, right, bottom), (iw, ih) = hm.crop, hm.image_size
    outside = [[left / iw / 2, 0.5], [(1 + right / iw) / 2, 0.5], [0.5, top / ih / 2], [0.5, (1 + bottom / ih) / 2]]
    got = driver.execute_script(OVERLAY, cell_points(hm) + outside)
    got["cells"], got["outside"] = np.array(got["points"][:-4]), [p for p, inside in zip(
        got["points"][-4:], [left > 0, right < iw, top > 0, bottom < ih]) if inside]
    return got


def shown(driver, title: str):
    wait(driver, lambda d: d.find_element("id", "heat").get_attribute("data-shown") == title
         and d.find_element("id", "where").get_attribute("aria-busy") is None)


def classified(driver, url, photo: Path, labels) -> None:
    open_page(driver, url)
    driver.find_element("id", "file").send_keys(str(photo.resolve()))
    driver.find_element("id", "labels").send_keys(", ".join(labels))
    driver.find_element("id", "classify-btn").click()
    wait(driver, lambda d: d.find_elements("css selector", "#results button.label"))
    assert driver.find_element("id", "where").is_displayed()
    assert not driver.find_element("id", "heat").is_displayed()  # no map until one is asked for


def label_button(driver, label: str):
    return next(b for b in driver.find_elements("css selector", "#results button.label")
                if b.get_attribute("data-label") == label)


def assert_drawn_over_the_map(got, values, lo: float, hi: float) -> None:
    """Drawn over the image's box exactly, nothing outside the map's crop, each cell's centre as opaque as
    its value on the scale says (so the map is neither shifted, flipped nor transposed)."""
    assert got["complete"] and got["canvas"] == pytest.approx(got["image"], abs=1)
    assert 0 < got["drawn"] < got["total"]
    assert got["outside"] and all(p[3] == 0 for p in got["outside"]), got["outside"]
    assert np.abs(got["cells"][:, 3] - expected_alpha(values, lo, hi)).max() <= 6, (got["cells"][:, 3], values)


def test_heatmap_overlay_of_a_clicked_label_and_of_another_by_keyboard(browser, server, out_dir):
    from selenium.webdriver.common.keys import Keys

    url, model, _ = server
    photo = DATA / "chelsea.jpg"  # 451 x 300: the map covers the centre square, the sides stay clear
    classified(browser, url, photo, LABELS)
    hm = model.heatmap(str(photo), LABELS, templates="short")
    lo, hi = float(hm.maps.min()), float(hm.maps.max())  # one scale over the labels: their maps compare
    alphas = expected_alpha(hm.maps.reshape(len(LABELS), -1), lo, hi)
    apart = np.abs(alphas[:, None] - alphas[None]).max(-1)
    a, b = (int(i) for i in np.unravel_index(apart.argmax(), apart.shape))  # the two maps the model tells apart most
    assert apart[a, b] > 40, apart
    label_button(browser, LABELS[a]).click()
    shown(browser, f"“{LABELS[a]}”")
    first = overlay(browser, hm)
    assert_drawn_over_the_map(first, hm.maps[a].ravel(), lo, hi)
    assert first["label"].startswith(f"Heat map of where “{LABELS[a]}” matches in the image: strongest at the ")
    assert first["alt"] == "the classified image, chelsea.jpg"
    assert browser.find_element("id", "heat-min").text == f"{lo:.3f}"
    assert browser.find_element("id", "heat-max").text == f"{hi:.3f}"
    assert browser.find_element("id", "heat-note").text.startswith("Exact: 4×4 cells")
    browser.execute_script("document.getElementById('where').scrollIntoView()")
    screenshot(browser, out_dir / "heatmap-label.png")

    label_button(browser, LABELS[b]).send_keys(Keys.ENTER)  # a label is a button: the keyboard reaches it
    shown(browser, f"“{LABELS[b]}”")
    second = overlay(browser, hm)
    assert_drawn_over_the_map(second, hm.maps[b].ravel(), lo, hi)
    assert np.abs(first["cells"][:, 3] - second["cells"][:, 3]).max() > 20  # another label, another picture
    assert label_button(browser, LABELS[b]).get_attribute("aria-pressed") == "true"
    assert label_button(browser, LABELS[a]).get_attribute("aria-pressed") == "false"


def test_heatmap_overlay_of_a_typed_text_on_a_tall_image(browser, server, out_dir, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, model, _ = server
    photo = tmp_path / "tall coffee.png"  # 400 x 600: the map covers the middle square, top and bottom stay clear
    with Image.open(DATA / "coffee.jpg") as img:
        img.transpose(Image.Transpose.ROTATE_90).save(photo)
    classified(browser, url, photo, LABELS)
    text = "a cup of coffee, seen from above"  # one text: the comma does not split it
    browser.find_element("id", "where-query").send_keys(text, Keys.ENTER)
    shown(browser, f"“{text}”")
    hm = model.heatmap(str(photo), [text], templates="short")
    got = overlay(browser, hm)
    assert_drawn_over_the_map(got, hm.maps[0].ravel(), float(hm.maps.min()), float(hm.maps.max()))
    assert browser.find_element("id", "heat-caption").text == f"Where “{text}” matches"
    browser.execute_script("document.getElementById('where').scrollIntoView()")
    screenshot(browser, out_dir / "heatmap-query.png")


@pytest.fixture(scope="module")
def mapless_server():
    """The app of a model whose image tower gives no spatial map (a flattening torch tower)."""
    from test_heatmap import lit

    from littune.serve.app import create_app

    model = lit({"type": "torch", "factory": "torch.nn:Flatten", "preprocess": {"size": 8, "resize": 8}})
    yield from _serve(create_app(model, model_name="flat"))


def test_heatmap_of_a_tower_without_a_map_says_so(browser, mapless_server):
    classified(browser, mapless_server, DATA / "coffee.jpg", LABELS)
    label_button(browser, LABELS[0]).click()
    error = wait(browser, lambda d: d.find_element("id", "where-error").is_displayed() and d.find_element("id", "where-error"))
    assert error.text.startswith("this model draws no heat maps: torch:torch.nn:Flatten") and "not a map" in error.text
    assert not browser.find_element("id", "heat").is_displayed()
    assert label_button(browser, LABELS[0]).get_attribute("aria-pressed") == "false"
