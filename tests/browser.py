"""A real headless Chromium for the UI tests: Debian's `chromium` and `chromium-driver`
(installed with apt-get when missing; nothing is downloaded from a browser vendor) driven by
selenium through chromedriver."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PACKAGES = ("chromium", "chromium-driver")
BROWSER_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        if found := shutil.which(name):
            return found
    for path in ("/usr/bin/chromium", "/usr/lib/chromium/chromium"):
        if Path(path).exists() and Path(path).name in names:
            return path
    return None


def _apt_install() -> None:
    """apt-get install the browser and its driver (root, or sudo without a password)."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return
    # a machine whose package lists were never fetched knows no chromium yet
    subprocess.run([*sudo, "apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(
            f"could not install {' '.join(PACKAGES)} with apt-get (exit {proc.returncode}):\n"
            f"{proc.stderr[-2000:]}"
        )


def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), installing them first when missing."""
    browser, driver = _which(BROWSER_NAMES), _which(DRIVER_NAMES)
    if browser is None or driver is None:
        _apt_install()
        browser, driver = _which(BROWSER_NAMES), _which(DRIVER_NAMES)
    if browser is None or driver is None:
        pytest.fail(f"apt-get installed {PACKAGES} but chromium/chromedriver are not on PATH")
    return browser, driver


def start_chromium(width: int = 1400, height: int = 1100) -> Any:
    """A selenium WebDriver on headless Chromium (as root: without the sandbox)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # Chromium refuses to run as root with it
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - a page still rendering raises; keep polling
            last = exc
        else:
            if last:
                return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def page_text(driver: Any) -> str:
    return driver.find_element("tag name", "body").text


def wait_for_text(driver: Any, texts: list[str], timeout_s: float = 60) -> str:
    """Wait until the page shows every one of ``texts``; returns the page's text."""

    missing = list(texts)

    def shown() -> str | None:
        text = page_text(driver)
        missing[:] = [t for t in texts if t not in text]
        return None if missing else text

    try:
        return wait_for(shown, timeout_s, f"the page to show {texts}")
    except AssertionError as err:
        raise AssertionError(f"{err}; missing {missing} on {driver.current_url}") from None


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    """``<name>.png`` of the window and ``<name>.txt`` of the page's text (what the step's
    assertions read), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    (folder / f"{name}.txt").write_text(f"{driver.current_url}\n\n{page_text(driver)}")
    assert path.stat().st_size > 5000, f"screenshot {path} is (nearly) empty"
    return path
