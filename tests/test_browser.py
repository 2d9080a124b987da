"""End to end in a real browser: serve an index, then upload, type, submit and see results in headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` packages through selenium (``.ci/run`` installs them); the test
skips, saying why, only where no browser is installed.
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.integration  # a browser, a server thread and an index: left out of the fast unit run

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install 'cirlab[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from cirlab.features.cache import FeatureCache  # noqa: E402
from cirlab.index import build_index, load_index  # noqa: E402
from cirlab.serve import create_app  # noqa: E402
from cirlab.serve.background import serve_in_thread  # noqa: E402
from imagefiles import make_gallery  # noqa: E402


def chromium_driver() -> webdriver.Chrome:
    """Headless Chromium driven by the system chromedriver (never a downloaded browser)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium/chromedriver on this machine: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    make_gallery(root / "images", 20)
    build_index(root / "images", root / "index", backbone="tiny", cache=FeatureCache(root / "cache"), log=print)
    index = load_index(root / "index")
    with serve_in_thread(create_app(index)) as url:
        yield url, index, root


def test_upload_type_submit_and_see_results(served, tmp_path):
    url, index, _ = served
    driver = chromium_driver()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) == 3)
        assert "20 images" in driver.find_element(By.ID, "summary").text

        reference = index.file(4)
        driver.find_element(By.ID, "upload").send_keys(str(reference))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#ref-preview img")))
        driver.find_element(By.ID, "text").send_keys("a red circle")
        Select(driver.find_element(By.ID, "method")).select_by_value("sum")
        Select(driver.find_element(By.ID, "k")).select_by_visible_text("6")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card.result")) == 6)

        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card.result")
        scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text) for c in cards]
        paths = [c.find_element(By.CSS_SELECTOR, ".path").text for c in cards]
        expected = index.search(index.compose(reference, "a red circle"), k=6)
        assert paths == [h.path for h in expected] and index.paths[4] not in paths
        assert scores == pytest.approx([h.score for h in expected], abs=1e-3)
        assert all(c.find_element(By.TAG_NAME, "img").get_property("naturalWidth") > 0 for c in cards)
        assert '"a red circle"' in driver.find_element(By.ID, "results-meta").text

        # Pick a gallery image as the next reference, with another method.
        driver.find_element(By.ID, "pick").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery-grid .card")) == 20)
        driver.find_element(By.CSS_SELECTOR, '#gallery-grid .card[data-id="7"]').click()
        assert index.paths[7] in driver.find_element(By.ID, "ref-label").text
        Select(driver.find_element(By.ID, "method")).select_by_value("image-only")
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "image-only" in d.find_element(By.ID, "results-meta").text)
        top = driver.find_element(By.CSS_SELECTOR, "#results .card.result .path").text
        assert top == index.search(index.compose(7, "", method="image-only"), k=1)[0].path
        driver.save_screenshot(str(tmp_path / "results.png"))
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()


def test_the_page_shows_server_errors(served):
    url, _, root = served
    driver = chromium_driver()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        not_an_image = root / "notes.png"
        not_an_image.write_text("not an image")
        driver.find_element(By.ID, "upload").send_keys(str(not_an_image))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "not a readable image" in d.find_element(By.ID, "status").text)
        assert "error" in driver.find_element(By.ID, "status").get_attribute("class")
    finally:
        driver.quit()
