"""Fixtures for the dashboard tests: a live service (SQLite, auth on) and a real headless Chromium.

Chromium is the Debian package (``/usr/bin/chromium``), driven through the ``playwright`` Python
package; no browser is ever downloaded. Without it the browser tests skip, except under CI
(``CI`` set), where a missing browser fails the run.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, LiveServer, start_server

CHROMIUM = os.environ.get("BOCOMPRESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI requires the browser tests: apt-get install chromium; pip install playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    if not Path(CHROMIUM).exists():
        _unavailable(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM,
                               args=["--headless", "--no-sandbox", "--disable-gpu",
                                     "--disable-background-networking", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live service with auth on, on a fresh SQLite database, shared by a test module."""
    db = tmp_path_factory.mktemp("dash") / "dash.db"
    srv = start_server(f"sqlite:///{db}", scheduler_interval=0.1, ask_wait_seconds=10)
    yield srv
    srv.stop()


@dataclass
class Console:
    """Console errors and uncaught exceptions of a page; ``expected`` substrings are ignored."""

    errors: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)

    def on_console(self, msg: Any) -> None:
        if msg.type == "error":
            self.errors.append(f"console: {msg.text}")

    def on_error(self, exc: Any) -> None:
        self.errors.append(f"pageerror: {exc}")

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(x in e for x in self.expected)]


def wait_for(page: Any, expression: str, timeout_ms: float = 15_000) -> Any:
    """Poll a JS expression in ``page`` every 20 ms until it is truthy; its value, or TimeoutError."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        try:
            value = page.evaluate(expression)
        except Exception as exc:  # noqa: BLE001 - the page may be navigating
            if "context was destroyed" not in str(exc) and "navigation" not in str(exc).lower():
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout_ms:.0f} ms: {expression}")
        page.wait_for_timeout(20)


@dataclass
class Tab:
    """A browser page, its console, and the server it talks to."""

    page: Any
    console: Console
    server: LiveServer

    def goto(self, path: str) -> Any:
        return self.page.goto(self.server.url + path)

    def login(self, token: str) -> None:
        self.goto("/login")
        self.page.fill("#token", token)
        self.page.click("#signin")
        self.page.wait_for_url(self.server.url + "/")

    def wait_for(self, expression: str, timeout_ms: float = 15_000) -> Any:
        """Poll a JS expression until it is truthy and return its value.

        (Playwright's ``wait_for_function`` evaluates its predicate with ``eval``, which the
        dashboard's Content-Security-Policy forbids; the tests keep the policy on.)
        """
        return wait_for(self.page, expression, timeout_ms)

    def wait_ready(self, timeout_ms: float = 15_000) -> float:
        """Wait for the page's own "rendered" marker and return it (ms since navigation start)."""
        return float(self.wait_for("window.__bocompressReady", timeout_ms))

    def shot(self, name: str, full_page: bool = True) -> Path:
        """Save a screenshot under ``test-artifacts/`` (scrolled to the top first)."""
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def assert_clean(self) -> None:
        bad = self.console.unexpected()
        assert not bad, f"browser errors on the page: {bad}"


@pytest.fixture
def tab(browser: Any, dash: LiveServer) -> Iterator[Tab]:
    """A fresh browser context (no cookies) with console capture, 1360×900."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(15_000)
    con = Console()
    page.on("console", con.on_console)
    page.on("pageerror", con.on_error)
    yield Tab(page, con, dash)
    ctx.close()
