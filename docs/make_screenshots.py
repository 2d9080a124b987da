"""Screenshots of the search page for the docs: serve an index, run two searches in headless Chromium, save PNGs.

Usage:
    python docs/make_screenshots.py INDEX_DIR [--out docs] [--reference ID] [--text "..."]

Writes ``serve_upload.png`` (an uploaded reference and its results) and ``serve_gallery.png`` (a gallery image
picked as the reference, with the gallery dialog used to pick it shown first in ``serve_picker.png``). Needs
Debian's ``chromium`` and ``chromium-driver`` and the ``[dev]`` extra (selenium).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from cirlab.index import load_index
from cirlab.serve import create_app
from cirlab.serve.background import serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--reference", type=int, default=0, help="gallery id of the uploaded reference")
    parser.add_argument("--text", default="make it red")
    parser.add_argument("--pick", type=int, default=1, help="gallery id picked in the second search")
    parser.add_argument("--pick-text", default="add a blue circle")
    args = parser.parse_args()

    index = load_index(args.index_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(flag)
    with serve_in_thread(create_app(index)) as url:
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(url)
            wait.until(lambda d: len(Select(d.find_element(By.ID, "method")).options) > 0)
            driver.find_element(By.ID, "upload").send_keys(str(index.file(args.reference)))
            driver.find_element(By.ID, "text").send_keys(args.text)
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card.result"))
            time.sleep(1.0)  # let the thumbnails finish loading
            args.out.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out / "serve_upload.png"))

            driver.find_element(By.ID, "pick").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery-grid .card")) > 0)
            time.sleep(1.0)
            driver.save_screenshot(str(args.out / "serve_picker.png"))
            driver.find_element(By.CSS_SELECTOR, f'#gallery-grid .card[data-id="{args.pick}"]').click()
            text = driver.find_element(By.ID, "text")
            text.clear()
            text.send_keys(args.pick_text)
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: args.pick_text in d.find_element(By.ID, "results-meta").text)
            time.sleep(1.0)
            driver.save_screenshot(str(args.out / "serve_gallery.png"))
        finally:
            driver.quit()
    print(f"wrote {args.out / 'serve_upload.png'}, {args.out / 'serve_picker.png'}, {args.out / 'serve_gallery.png'}")


if __name__ == "__main__":
    main()
