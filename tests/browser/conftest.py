"""Playwright with Debian's Chromium (installed by .ci/run) against the real app on 127.0.0.1."""
import os
import shutil
import time

import pytest

from .app_server import AppServer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LOADED = "#conversations label"  # the page's load event has shown the chats this browser keeps
STEP_DELAY = "0.005"  # seconds per decode step: long answers take long enough to press Stop


def _chromium_or_skip():
    """Chromium is a Debian package, not a pip one: without it the browser tests say how to get it
    (a skip, which fails a CI run: see tests/conftest.py)."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} not found: install it with apt-get install chromium (see .ci/run)")


def holds_for(condition, seconds: float, what: str) -> None:
    """A negative check (nothing more arrives after Stop, nothing changes after a refusal): a
    fixed window is the only way to see an absence, so `condition()` is polled throughout it and
    the first change fails at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.05)


@pytest.fixture(scope="module")
def app_server():
    _chromium_or_skip()
    server = AppServer("--step-delay", STEP_DELAY)
    yield server
    server.stop()
    assert "Traceback" not in server.log(tail=10**7), server.log()
    assert server.process.returncode == 0, server.log()  # SIGTERM shuts down cleanly
    server.log_path.unlink()


@pytest.fixture(scope="module")
def browser():
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser, app_server):
    """Open the chat page in a fresh browser context (its own storage); closed after the test."""
    contexts = []

    def open_page(locale="en-US"):
        context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 860},
                                      accept_downloads=True)
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        page.goto(app_server.url)
        page.wait_for_selector(LOADED)
        return page

    yield open_page
    for context in contexts:
        context.close()
