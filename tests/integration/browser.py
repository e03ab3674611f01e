"""A headless browser for tests: Playwright for Python driving Debian's Chromium.

No browser is downloaded (``playwright install`` is never run): the tests use the
``chromium`` package from apt (``scripts/setup.sh`` installs it) at ``/usr/bin/chromium``.
Tests that use these fixtures skip, with the reason, only when that binary is missing.

Reuse from any integration test (``tests/integration/conftest.py`` re-exports the
fixtures, so nothing needs importing for them)::

    from browser import needs_chromium, screenshot

    @needs_chromium
    def test_something(page: Page) -> None:
        page.goto("http://127.0.0.1:8080/")
        screenshot(page, "something")

``chromium`` (one browser per test module) and ``page`` (a fresh context per test, whose
uncaught JavaScript errors fail the test at teardown) are the fixtures.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SKIP_REASON = (f"Debian's Chromium is not installed ({CHROMIUM} is missing): "
               "`apt-get install -y chromium` or scripts/setup.sh")
VIEWPORT = {"width": 1440, "height": 900}

#: Mark a test (or a module, in ``pytestmark``) that drives the browser.
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=SKIP_REASON)


def artifacts_dir() -> Path:
    """Where tests leave screenshots: ``$AIVA_TEST_ARTIFACTS``, else
    ``/tmp/aiva-test-artifacts``; created if missing."""
    path = Path(os.environ.get("AIVA_TEST_ARTIFACTS") or "/tmp/aiva-test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG of the page as ``<artifacts>/<name>.png`` and return its path."""
    path = artifacts_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Chromium for one test module (closed, with Playwright, at its end)."""
    if not CHROMIUM.exists():
        pytest.skip(SKIP_REASON)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    """A page in a fresh context (no cookies or storage from other tests). An uncaught
    JavaScript error on it fails the test."""
    context = chromium.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught JavaScript errors on the page: {errors}"
