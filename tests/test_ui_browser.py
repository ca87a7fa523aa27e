"""The playground in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) via Selenium.

Loads the page, opens the Compare tab, runs one before/after comparison of a finished run, waits for the images and
saves a screenshot to ``tests/output/ui_compare.png`` (gitignored). ``make install`` installs Chromium and Selenium.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erasure.config import validate_job
from erasure.registry import list_methods, register_method, unregister_method
from generators.minicanvas.paths import WORLD_ENV_VAR

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OUTPUT_DIR = Path(__file__).resolve().parent / "output"
WAIT_S = 900  # generous: CI machines with 2 busy cores are slow

# `make test` installs both (Makefile target `chromium`); a missing browser is a failed set-up, not a skip.
assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
    "chromium/chromedriver are not installed: run `make install`"
)

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,2200",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server_with_a_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app on a tiny world, with one finished run (test_shift erased style:Ember) to compare."""
    from conftest import ShiftBias
    from tiny_world import build_tiny_world

    from erasure.runner import run_erase
    from ui.server import launch
    from ui.settings import Limits, UISettings

    base = tmp_path_factory.mktemp("ui-browser")
    world = build_tiny_world(base / "world")
    registered = ShiftBias.name not in list_methods()
    if registered:
        register_method(ShiftBias)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORLD_ENV_VAR, str(world))
        job = validate_job(
            {
                "name": "shift-ember",
                "device": "cpu",
                "backbone": "minicanvas-sd",
                "method": {"name": "test_shift", "params": {"steps": 2}},
                "target": "style:Ember",
            },
            source="test",
        )
        run_erase(job, base / "runs" / "shift-ember", echo=lambda line: None)
        limits = Limits(max_images_per_concept=2, max_sample_steps=2)
        server = launch(
            UISettings(runs_dir=base / "runs", device="cpu", limits=limits),
            port=free_port(),
            block=False,
            quiet=True,
        )
        try:
            yield server
        finally:
            server.close()
            if registered:
                unregister_method(ShiftBias.name)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def test_click_through_one_comparison(server_with_a_run: Any, browser: webdriver.Chrome) -> None:
    OUTPUT_DIR.mkdir(exist_ok=True)
    try:
        _click_through(browser, server_with_a_run.url)
    except Exception:
        browser.save_screenshot(str(OUTPUT_DIR / "ui_compare_failed.png"))  # what the page showed, to debug
        raise
    screenshot = OUTPUT_DIR / "ui_compare.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _click_through(browser: webdriver.Chrome, url: str) -> None:
    wait = WebDriverWait(browser, WAIT_S)
    browser.get(url)
    wait.until(lambda d: "Erasure Studio" in d.find_element(By.TAG_NAME, "body").text)

    tab = wait.until(lambda d: _visible(d, "//button[@role='tab' and normalize-space()='Compare']"))
    tab.click()
    # The newest run is preselected when the page loads; its retained concepts are then filled in from it
    # (Cinder, the erased Ember's look-alike, comes first).
    wait.until(lambda d: "shift-ember" in _value(d, "#compare-run input"))
    wait.until(lambda d: "Cinder" in d.find_element(By.ID, "retained-concepts").text)
    wait.until(lambda d: _visible(d, "//*[@id='compare-button']")).click()

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#target-gallery img")) >= 4)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#retained-gallery img")) >= 4)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#before-after-slider img")) >= 1)
    assert "before · A circle image in Ember" in browser.find_element(By.ID, "target-gallery").text


def _visible(driver: webdriver.Chrome, xpath: str) -> Any:
    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            return element
    return False


def _value(driver: webdriver.Chrome, css: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, css)
    return (elements[0].get_attribute("value") or "") if elements else ""
