"""Open a written report in a real headless Chromium: does every image load, is the console clean?

`write_report` never needs a browser (the report is always written); this check is what `ditnas report`
runs afterwards, and what the tests run on CI (`.ci/run` installs `chromium chromium-driver` from the
OS packages). It drives the system Chromium through its chromedriver with Selenium, loads the file by a
file:// URL (no network) and reads back, from the page itself, which <img> elements decoded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ditnas.errors import DitnasError

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)
INSTALL_HINT = "apt-get install chromium chromium-driver"
MAX_FULL_HEIGHT = 16000  # a screenshot of "the whole page" stops here (Chromium's own limit is ~16k px)

# every <img>, whether it decoded: `complete` alone is also true for a broken image, naturalWidth is not
_IMAGES_JS = """return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.complete,
                                                              i.getAttribute('src') || '']);"""


class BrowserMissing(DitnasError):
    """No usable Chromium, chromedriver or Selenium on this machine: the render check cannot run."""


@dataclass(frozen=True)
class RenderResult:
    images_total: int
    images_loaded: int
    broken_images: tuple[str, ...]  # the srcs of images that did not decode, shortened
    console_errors: tuple[str, ...]  # SEVERE entries of the browser's log (console.error, uncaught exceptions)
    title: str
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return not self.broken_images and not self.console_errors

    def summary(self) -> str:
        shot = f", screenshot {self.screenshot}" if self.screenshot else ""
        return (f"{self.images_loaded}/{self.images_total} images loaded, {len(self.console_errors)} console "
                f"error(s){shot}")


def _shorten(src: str, keep: int = 48) -> str:
    return src if len(src) <= keep else f"{src[:keep]}… ({len(src)} chars)"


def _first_line(exc: Exception) -> str:
    return next(iter((getattr(exc, "msg", None) or str(exc)).strip().splitlines()), type(exc).__name__)


def _executable(env: str, names: tuple[str, ...], what: str) -> str:
    """The path from the env override if set (it must exist), else the first of `names` on PATH."""
    override = os.environ.get(env)
    if override:
        if Path(override).is_file() and os.access(override, os.X_OK):
            return override
        raise BrowserMissing(f"{env}={override} is not an executable file; point it at the {what} or unset it "
                             f"(Debian: {INSTALL_HINT})")
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing(f"no {what} found on PATH (looked for {', '.join(names)}); install it with "
                         f"`{INSTALL_HINT}` or set {env}")


def find_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or BrowserMissing saying which is missing and how to install it."""
    try:
        import selenium  # noqa: F401  (a dev extra: the report itself needs no browser)
    except ImportError:
        raise BrowserMissing("the Python package selenium is not installed; `pip install -e '.[dev]'` "
                             "(or `pip install selenium`)") from None
    return (_executable("DITNAS_CHROMIUM", BROWSER_NAMES, "Chromium browser"),
            _executable("DITNAS_CHROMEDRIVER", DRIVER_NAMES, "chromedriver"))


def check_render(html: Path, screenshot: Path | None = None, *, width: int = 1280, height: int | None = None,
                 timeout_s: float = 30.0) -> RenderResult:
    """Load `html` in headless Chromium; count decoded images and SEVERE console entries.

    With `screenshot`, save a PNG `width` px wide and `height` px tall (None: the page's full height, at most
    MAX_FULL_HEIGHT). Raises BrowserMissing when Chromium, chromedriver or selenium is absent, DitnasError
    when the file is missing or the browser does not start.
    """
    html = Path(html)
    if not html.is_file():
        raise DitnasError(f"{html} does not exist; write it first (`ditnas report <run dir>`)")
    chromium, chromedriver = find_browser()

    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--hide-scrollbars", f"--window-size={width},1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        # an explicit chromedriver path: Selenium Manager (which would download one) is never consulted
        # log_output: chromedriver's and Debian's chromium wrapper's own chatter is not the page's console
        service = Service(executable_path=chromedriver, log_output=subprocess.DEVNULL)
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as exc:
        raise DitnasError(f"Chromium ({chromium}) did not start under {chromedriver}: {_first_line(exc)}; check "
                          f"that the two versions match (`{INSTALL_HINT}` installs a matching pair)") from None
    try:
        driver.set_page_load_timeout(timeout_s)
        driver.get(html.resolve().as_uri())  # returns after the load event, i.e. after the images settled
        deadline = time.monotonic() + timeout_s
        images = driver.execute_script(_IMAGES_JS)
        while not all(img[1] for img in images) and time.monotonic() < deadline:  # still decoding
            time.sleep(0.1)
            images = driver.execute_script(_IMAGES_JS)
        errors = tuple(e.get("message", "") for e in driver.get_log("browser") if e.get("level") == "SEVERE")
        shot = None
        if screenshot is not None:
            page_h = int(driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)"))
            h = height if height is not None else min(max(page_h, 1), MAX_FULL_HEIGHT)
            # the viewport itself, exactly width x h at scale 1 (a window size would include browser chrome)
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                   {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False})
            shot = Path(screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            if not driver.save_screenshot(str(shot)):
                raise DitnasError(f"Chromium could not write the screenshot {shot}; check the folder is writable")
        return RenderResult(images_total=len(images), images_loaded=sum(1 for img in images if img[0]),
                            broken_images=tuple(_shorten(img[2]) for img in images if not img[0]),
                            console_errors=errors, title=driver.title, screenshot=shot)
    except WebDriverException as exc:  # a timeout or a crashed tab: one line, not Selenium's stack trace
        raise DitnasError(f"Chromium failed while rendering {html}: {_first_line(exc)}; open it in a browser to "
                          "see why, or rerun with `--no-check`") from None
    finally:
        driver.quit()
