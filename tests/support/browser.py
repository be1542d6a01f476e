"""A real headless Chromium for tests of the pages the mirror serves.

Debian's ``chromium`` is driven through Debian's ``chromedriver`` (the two packages are built from
the same source, so their versions always match) with Selenium as the WebDriver client::

    with open_browser(tmp_path) as browser:
        await asyncio.to_thread(browser.get, f"{url}/status", user="alice", password="s3cret")
        await asyncio.to_thread(browser.wait_for, lambda b: b.text("#out") != "pending")
        assert await asyncio.to_thread(browser.console_errors) == []

Every method blocks, so an async test calls them through ``asyncio.to_thread``: a page served by
the test's own event loop could not load while the loop waits on the browser (``get`` would hang
until its page-load timeout). Starting and stopping the browser (``open_browser``) takes about half
a second and needs no server, so it may run on the loop.

Nothing is fetched from the internet. The chromedriver path is given to Selenium's ``Service``, so
Selenium Manager (which would look for a driver online) never runs; Chromium starts with a fresh
profile, background networking, component updates and sync off, no proxy, and a host resolver that
answers "not found" for every host but 127.0.0.1, localhost and ::1; ``get`` refuses any other.
Chromium 156 still starts two requests no switch here stops (a component update check at
update.googleapis.com and an account list at accounts.google.com): the resolver fails them at
once, with no DNS query and no packet sent (checked with ``--log-net-log``).

HTTP Basic authentication: credentials in the URL (``http://user:pass@127.0.0.1:port/status``)
load that page, but the document's URL then carries them, and a relative ``fetch('/api/x')`` on it
throws ``TypeError: Request cannot be constructed from a URL that includes credentials`` (the
Fetch standard forbids them): the page's own scripts break. So ``get`` refuses such URLs, and
``get(url, user=..., password=...)`` (or ``login``) instead has Chromium send an ``Authorization:
Basic`` header with every request of the tab, navigations and the page's ``fetch()`` calls alike,
through the DevTools protocol's ``Network.setExtraHTTPHeaders``. Like a browser that has been
logged in, the header stays for later ``get`` calls until ``logout``. Without credentials, a page
that answers 401 with a Basic challenge loads as an empty document (headless Chromium has no login
dialog to show) and logs a console error "Failed to load resource: ... status of 401".
"""

from __future__ import annotations

import base64
import contextlib
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
"""Debian's chromium (a shell wrapper that sources /etc/chromium.d, then runs /usr/lib/chromium)."""

CHROMEDRIVER = "/usr/bin/chromedriver"
"""Debian's chromedriver, from the chromium-driver package."""

WINDOW_SIZE = (1280, 1600)
"""Width and height of the window, and so of screenshots."""

PAGE_LOAD_TIMEOUT = 30.0
"""Seconds ``get`` waits for a page to load (WebDriver's default is 300)."""

POLL_INTERVAL = 0.05
"""Seconds between two checks of a ``wait_for`` predicate."""

_PAGE_TEXT_IN_ERRORS = 3000
"""Characters of the page's text quoted when a wait times out."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
"""The only hosts the browser can reach (every other name or address fails as not found)."""

CHROMIUM_ARGUMENTS = (
    "--headless",
    # Tests run as root, where Chromium's sandbox refuses to start.
    "--no-sandbox",
    "--disable-gpu",
    # Containers often have a 64 MiB /dev/shm, too small for Chromium's shared memory: use /tmp.
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,NetworkTimeServiceQuerying",
    # Never a proxy from the environment, and no host resolves but the loopback ones (the rule
    # applies to IP literals too, so 127.0.0.1 needs its own exclusion).
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, " + ", ".join(f"EXCLUDE {host}" for host in LOOPBACK_HOSTS),
    f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
)


class BrowserStartError(RuntimeError):
    """Chromium or chromedriver did not start; the message carries the tail of chromedriver's log."""


class BrowserWaitTimeout(AssertionError):
    """A ``wait_for`` predicate stayed false; the message quotes the page's URL, text and console errors."""


def _is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("about", "data") or parts.hostname in LOOPBACK_HOSTS


class Browser:
    """A headless Chromium session. Every method blocks; call them through ``asyncio.to_thread``.

    ``driver`` is Selenium's own ``webdriver.Chrome`` for whatever these methods do not cover.
    """

    def __init__(self, driver: webdriver.Chrome, log: Path) -> None:
        self.driver = driver
        self.log = log
        """chromedriver's log (with Chromium's own output), for when something goes wrong."""
        self.console_log: list[dict[str, Any]] = []
        """Every console entry read from the browser so far (``level``, ``message``, ``source``,
        ``timestamp``), as WebDriver's log hands them out: once each."""
        self._errors_reported = 0

    def get(self, url: str, *, user: str | None = None, password: str | None = None) -> None:
        """Load ``url`` (on loopback) and wait for its ``load`` event; with ``user`` and ``password``,
        log in first (see ``login``). Credentials in the URL itself are refused: they break the
        page's relative ``fetch()`` calls."""
        if not _is_loopback(url):
            raise ValueError(f"the test browser only loads loopback URLs, not {url}")
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL break the page's own fetch() calls: "
                             "pass user= and password= to get() instead")
        if user is not None or password is not None:
            if user is None or password is None:
                raise ValueError("give both user and password, or neither")
            self.login(user, password)
        self.driver.get(url)

    def login(self, user: str, password: str) -> None:
        """Send ``Authorization: Basic`` with these credentials on every later request of this tab
        (navigations, subresources, ``fetch()``), to any origin, until ``logout``."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})

    def logout(self) -> None:
        """Stop sending the credentials given to ``login``."""
        self.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})

    def text(self, css_selector: str) -> str:
        """The rendered text of the first element matching ``css_selector`` (NoSuchElementException if none)."""
        return str(self.driver.find_element(By.CSS_SELECTOR, css_selector).text)

    def click(self, css_selector: str) -> None:
        """Click the first element matching ``css_selector``."""
        self.driver.find_element(By.CSS_SELECTOR, css_selector).click()

    def wait_for(self, predicate: Callable[[Browser], bool], timeout: float = 10, *, message: str = "") -> None:
        """Poll ``predicate(self)`` until it is true. An element it looks for that is missing or was
        replaced meanwhile counts as false. On timeout, BrowserWaitTimeout quotes ``message``, the
        page's URL and text and the console errors so far."""
        waiting: WebDriverWait[webdriver.Chrome] = WebDriverWait(
            self.driver, timeout, poll_frequency=POLL_INTERVAL,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
        start = time.monotonic()
        try:
            waiting.until(lambda _: predicate(self))
        except TimeoutException:
            elapsed = time.monotonic() - start
            self._read_console()
            errors = [str(entry.get("message")) for entry in self.console_log if _is_error(entry)]
            raise BrowserWaitTimeout(
                f"{message or 'condition'} not met after {elapsed:.1f}s on {self.driver.current_url}\n"
                f"--- page text ---\n{self._page_text()}\n"
                f"--- console errors ---\n" + ("\n".join(errors) or "(none)")) from None

    def screenshot(self, path: str | Path) -> Path:
        """Save the viewport as a PNG at ``path``, and return the path."""
        target = Path(path)
        if not self.driver.save_screenshot(str(target)):
            raise OSError(f"could not write the screenshot to {target}")
        return target

    def console_errors(self) -> list[str]:
        """Messages of the console entries at level SEVERE logged since the previous call:
        ``console.error(...)``, uncaught exceptions, and failed loads (an answer of 4xx or 5xx to
        the page's requests and ``fetch()`` calls). The browser's own request for ``/favicon.ico``,
        which no page asked for, is left out when it fails (it stays in ``console_log``)."""
        self._read_console()
        new = self.console_log[self._errors_reported:]
        self._errors_reported = len(self.console_log)
        return [str(entry.get("message")) for entry in new if _is_error(entry)]

    def _read_console(self) -> None:
        """Move the entries WebDriver has buffered (it hands each out once) into ``console_log``."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        self.console_log.extend(entries)

    def _page_text(self) -> str:
        try:
            text = str(self.driver.find_element(By.TAG_NAME, "body").text)
        except WebDriverException:
            text = str(self.driver.page_source)
        if len(text) > _PAGE_TEXT_IN_ERRORS:
            text = text[:_PAGE_TEXT_IN_ERRORS] + f"\n... ({len(text) - _PAGE_TEXT_IN_ERRORS} more characters)"
        return text


def _is_error(entry: dict[str, Any]) -> bool:
    """A SEVERE console entry, other than the failed load of the favicon Chromium asks for itself
    (``http://127.0.0.1:port/favicon.ico - Failed to load resource: ... 404 (Not Found)``)."""
    if entry.get("level") != "SEVERE":
        return False
    url = str(entry.get("message", "")).split(" ", 1)[0]
    return not (entry.get("source") == "network" and urlsplit(url).path == "/favicon.ico")


def _log_tail(log: Path, size: int = 4000) -> str:
    try:
        return log.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def open_browser(tmp_path: Path) -> Iterator[Browser]:
    """Start headless Chromium with a fresh profile under ``tmp_path``; quit it on exit.

    Chromium and chromedriver come from Debian (``require_binary`` installs them as root, and skips
    the test locally or fails it under CI when they cannot be had). Console messages of every level
    are kept for ``Browser.console_errors``.
    """
    # Imported here: conftest imports the support modules, and may one day import this one.
    from tests.conftest import require_binary, unavailable

    require_binary("chromium")
    require_binary("chromedriver")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file():
            unavailable(f"{path} is missing (Debian package {package})")

    tmp_path.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={workdir / 'profile'}")
    # The first tab would be the new-tab page, which tries the default search engine's (Debian's:
    # DuckDuckGo) own page before falling back to a local one.
    options.add_experimental_option("prefs", {"session.restore_on_startup": 4, "session.startup_urls": ["about:blank"]})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Selenium's own connection to chromedriver on 127.0.0.1: never through a proxy from the
    # environment. Deprecated for a ClientConfig, which webdriver.Chrome does not take.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        options.ignore_local_proxy_environment_variables()
    log = workdir / "chromedriver.log"
    service = Service(executable_path=CHROMEDRIVER, log_output=str(log))
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except WebDriverException as error:
        raise BrowserStartError(f"chromium did not start: {error.msg}\n--- {log} ---\n{_log_tail(log)}") from error
    try:
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
        yield Browser(driver, log)
    finally:
        driver.quit()
