"""Screenshot the served page for the README: start ``app.py``, compress an example, decode its ρ strip, draw its
rate–distortion plot, save a full-page PNG.

    python scripts/screenshot.py [--checkpoint DIR] [--image assets/chelsea.png] [--out docs/screenshot.png]; the README shows it converted to JPEG

Needs Debian's ``chromium`` and ``chromium-driver``. ``serve``, ``browser`` and ``compress``
are shared with tests/test_browser.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoint=None, timeout: float = 300, log=subprocess.DEVNULL):
    """Run ``python app.py`` on a free localhost port; yield its URL once it answers."""
    port = _free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    if checkpoint is not None:
        env["CDC_CHECKPOINT"] = str(checkpoint)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with status {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"app.py did not answer at {url} within {timeout} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser(width: int = 1600, height: int = 1000):
    """Headless Chromium through the system chromedriver (selenium-manager downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory(prefix="cdc-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def find(driver, css: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_text(driver, css: str, text: str, timeout: float) -> str:
    """Wait until an element matching ``css`` contains ``text``; return that element's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def match(d):
        return next((e.text for e in d.find_elements(By.CSS_SELECTOR, css) if text in e.text), False)

    return WebDriverWait(driver, timeout, poll_frequency=0.5).until(match)


def compress(driver, url: str, image, timeout: float = 600) -> str:
    """Open the page, upload ``image``, press Compress; return the readout text once it shows the rate."""
    driver.get(url)
    find(driver, "#input-image input[type=file]").send_keys(str(Path(image).resolve()))
    find(driver, "#input-image img")  # the upload has reached the server and is previewed
    find(driver, "#compress-button").click()
    return wait_text(driver, "#readout", "bpp", timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="pipeline folder (default: the app's, checkpoints/cdc)")
    parser.add_argument("--image", default=ROOT / "assets" / "chelsea.png")
    parser.add_argument("--out", default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args()
    with serve(args.checkpoint, log=None) as url, browser(args.width) as driver:
        print(compress(driver, url, args.image))
        find(driver, "#strip-button").click()
        print(wait_text(driver, "#strip-info", "reconstructions", timeout=600))
        find(driver, "#plot-button").click()
        print(wait_text(driver, "#plot-info", "Computed in", timeout=600))
        time.sleep(2)  # let the slider, gallery and plot images finish loading
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, height + 100)
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(args.out)):
            raise SystemExit(f"error: could not write {args.out}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
