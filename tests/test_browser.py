"""The served page in headless Chromium: compress an upload, switch the comparison, decode a ρ strip, plot the
rate–distortion curves, download the reconstruction, then see a corrupt .cdc rejected."""

import io
import re
import sys
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import screenshot  # noqa: E402

from app.bitstream import bits_per_pixel  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (Path(screenshot.CHROMIUM).exists() and Path(screenshot.CHROMEDRIVER).exists()),
    reason=f"needs {screenshot.CHROMIUM} and {screenshot.CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


def test_page(tiny_pipeline_dir, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "cat.png"
    Image.open(ROOT / "assets" / "chelsea.png").resize((128, 96)).save(image)
    corrupt = tmp_path / "corrupt.cdc"
    corrupt.write_bytes(b"\x89CDC" + bytes(60))

    with screenshot.serve(tiny_pipeline_dir) as url, screenshot.browser() as driver:
        readout = screenshot.compress(driver, url, image, timeout=300)
        link = screenshot.find(driver, "#cdc-download a").get_attribute("href")
        with urllib.request.urlopen(link) as response:
            data = response.read()
        assert float(re.search(r"([\d.]+) bpp", readout).group(1)) == round(bits_per_pixel(data), 3)
        assert "128×96" in readout and "AVIF" in readout
        png = screenshot.find(driver, "#png-download a").get_attribute("href")
        with urllib.request.urlopen(png) as response:
            assert Image.open(io.BytesIO(response.read())).size == (128, 96)

        assert "AVIF" in screenshot.find(driver, "#compare").text  # the default pair: AVIF | CDC
        next(e for e in driver.find_elements(By.CSS_SELECTOR, "#left-side label") if e.text == "Original").click()
        screenshot.wait_text(driver, "#compare", "Original | CDC", timeout=30)

        screenshot.find(driver, "#strip-button").click()
        strip = screenshot.wait_text(driver, "#strip-info", "reconstructions", timeout=120)
        assert "3 reconstructions" in strip  # ρ 0, 0.5 and the chosen 0.9
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rho-strip img")) >= 3

        screenshot.find(driver, "#plot-button").click()
        screenshot.wait_text(driver, "#plot-info", "Computed in", timeout=300)
        screenshot.find(driver, "#rd-plot img")

        tabs = driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
        next(tab for tab in tabs if tab.text == "Decompress").click()
        screenshot.find(driver, "#cdc-upload input[type=file]").send_keys(str(corrupt))
        screenshot.wait_text(driver, "#cdc-upload", "corrupt", timeout=30)  # uploaded
        screenshot.find(driver, "#decompress-button").click()
        message = screenshot.wait_text(driver, "[data-testid=toast-text]", "Cannot decode this file", timeout=60)
        assert "version" in message and "Traceback" not in driver.page_source
