"""Driving the web demo in headless Chromium (selenium and the system's chromium / chromium-driver: no
browser download), for the browser tests and the latency benchmark (``pip install 'ovd[test]'``).

A Chromium that resolves no host but 127.0.0.1 and logs every request, a guard that refuses (and
records) any non-loopback connection of this process, and the page's controls by element id
(``ovd.app.page.IDS``).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
DRIVER_PATHS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/lib/chromium-browser/chromedriver")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
WAIT_S = 60.0


def find_browser() -> tuple[str | None, str | None, str]:
    """``(chromium, chromedriver, reason)``: the paths, or None and why not."""
    browser = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    driver = next((shutil.which(p) for p in DRIVER_PATHS if shutil.which(p)), None)
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
    reason = f"no {' and no '.join(missing)} (apt-get install -y chromium chromium-driver)" if missing else ""
    return browser, driver, reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_only() -> Iterator[list[str]]:
    """Refuse (and record) every connection this process tries to a non-loopback address."""
    attempts: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and str(address[0]) not in LOOPBACK:
            attempts.append(str(address))
            raise OSError(f"test: no network ({address})")
        return connect(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and str(host) not in LOOPBACK and not str(host).startswith("127."):
            attempts.append(str(host))
            raise socket.gaierror(f"test: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_getaddrinfo  # type: ignore[method-assign]
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo  # type: ignore[method-assign]


def start_chromium(browser: str, driver: str, *, width: int = 1400, height: int = 1100) -> Any:
    """Headless Chromium that resolves no host but 127.0.0.1, logs its network requests and has a
    synthetic webcam."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        f"--window-size={width},{height}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--use-fake-device-for-media-stream",  # a synthetic webcam, access granted without a prompt
        "--use-fake-ui-for-media-stream",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def requested_urls(driver: Any) -> list[str]:
    """URLs the page requested since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def external(urls: list[str], base: str) -> list[str]:
    return [u for u in urls if not u.startswith((base, "data:", "blob:", "about:"))]


def wait_for(predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.find_elements("css selector", "#run"), "the page")


def upload(driver: Any, path: str | Path) -> None:
    css(driver, "#image input[type=file]").send_keys(str(path))
    wait_for(lambda: driver.find_elements("css selector", "#image img"), "the uploaded image's preview")


def type_vocabulary(driver: Any, text: str) -> None:
    box = css(driver, "#vocabulary textarea")
    box.clear()
    if len(text) < 200:
        box.send_keys(text)  # typed key by key
    else:  # a long list: set at once, as a paste does
        driver.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            box,
            text,
        )
    wait_for(lambda: box.get_attribute("value") == text, "the vocabulary box")


def move_slider(driver: Any, steps_from_zero: int) -> float:
    """Move the confidence slider to its minimum, then ``steps`` steps right; returns its value."""
    from selenium.webdriver.common.keys import Keys

    slider = css(driver, "#confidence input[type=range]")
    slider.send_keys(Keys.HOME)
    for _ in range(steps_from_zero):
        slider.send_keys(Keys.ARROW_RIGHT)
    return float(css(driver, "#confidence input[type=number]").get_attribute("value"))


def choose(driver: Any, element_id: str, option: str) -> None:
    """Pick ``option`` in a dropdown (retried while the option list re-renders)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def pick() -> bool:
        try:
            css(driver, f"#{element_id} input").click()
            items = [li for li in driver.find_elements("css selector", "li[role=option]") if li.text.strip() == option]
            if not items:
                return False
            items[0].click()
            return css(driver, f"#{element_id} input").get_attribute("value") == option
        except StaleElementReferenceException:
            return False

    wait_for(pick, f"option {option!r} of #{element_id}")


def status(driver: Any) -> str:
    return css(driver, "#status").text.strip()


def press_run(driver: Any, request: int) -> str:
    """Press Detect and wait for the status of request number ``request``; returns the status text."""
    css(driver, "#run").click()
    return wait_for(lambda: status(driver).startswith(f"Request {request}:") and status(driver), "the result")


_READ_TABLE = """
const [root, done] = [document.querySelector(arguments[0]), arguments[arguments.length - 1]];
const viewport = root.querySelector('.virtual-table-viewport');
const rows = {};
const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
(async () => {
  for (let top = 0; ; top += 200) {
    if (viewport) { viewport.scrollTop = top; await frame(); }
    root.querySelectorAll('.virtual-row').forEach(row => {
      rows[row.dataset.index] = [...row.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim());
    });
    if (!viewport || viewport.scrollTop + viewport.clientHeight >= viewport.scrollHeight - 1) break;
  }
  if (viewport) viewport.scrollTop = 0;
  done(Object.keys(rows).sort((a, b) => a - b).map(k => rows[k]));
})();
"""


def read_table(driver: Any, element_id: str = "table") -> list[list[str]]:
    """Every row of a results table (scrolling its virtualised body)."""
    driver.set_script_timeout(WAIT_S)
    return driver.execute_async_script(_READ_TABLE, f"#{element_id}")


def image_bytes(driver: Any, element_id: str) -> bytes:
    """The file behind the image an image component shows, fetched from its URL (loopback)."""
    src = css(driver, f"#{element_id} img[src^=http]").get_attribute("src")
    with urllib.request.urlopen(src, timeout=WAIT_S) as response:
        return response.read()


def read_image(driver: Any, element_id: str = "annotated") -> np.ndarray:
    """The annotated image shown in the page, as RGB."""
    return np.asarray(Image.open(io.BytesIO(image_bytes(driver, element_id))).convert("RGB"))


def webcam_snapshot(driver: Any) -> None:
    """Switch the image input to the webcam, allow it and take a snapshot."""
    css(driver, '#image button[aria-label="Capture from camera"]').click()
    allow = wait_for(
        lambda: (
            driver.find_elements("css selector", '#image [title="grant webcam access"] button')
            or driver.find_elements("css selector", '#image button[aria-label="capture photo"]')
        ),
        "the webcam",
    )
    if allow[0].get_attribute("aria-label") != "capture photo":
        allow[0].click()
    capture = wait_for(
        lambda: driver.find_elements("css selector", '#image button[aria-label="capture photo"]'), "the capture button"
    )
    wait_for(
        lambda: driver.execute_script(
            "const v = document.querySelector('#image video'); return v && v.readyState >= 2"
        ),
        "the video",
    )
    capture[0].click()
    wait_for(lambda: driver.find_elements("css selector", "#image img[src^=http]"), "the snapshot")


def link(driver: Any, element_id: str) -> str:
    return css(driver, f"#{element_id} a[href]").get_attribute("href")


def sort_table(driver: Any, column: str, *, ascending: bool, element_id: str = "table") -> None:
    """Sort a results table by a column through its header menu."""
    button = css(driver, f'#{element_id} th[title="{column}"] button[aria-label="Open cell menu"]')
    driver.execute_script("arguments[0].click()", button)  # shown on hover only
    label = "Sort ascending" if ascending else "Sort descending"
    item = wait_for(
        lambda: [b for b in driver.find_elements("css selector", "[role=menuitem]") if b.text.strip() == label],
        f"the {label!r} menu item",
    )
    item[0].click()
