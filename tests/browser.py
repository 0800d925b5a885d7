"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright.

Playwright's own browser download needs the internet; Debian's package does not (``.ci/run``
installs it with ``apt-get install -y chromium``). Without it the browser tests skip, saying so
in one sentence.
"""

import contextlib
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SKIP_WHY = "Chromium is not installed here (apt-get install -y chromium), so the browser tests cannot run."


def require_chromium():
    if not Path(CHROMIUM).is_file():
        pytest.skip(SKIP_WHY)


@contextlib.contextmanager
def chromium(viewport=(1280, 900)):
    """A fresh browser context whose requests outside 127.0.0.1 are refused and recorded
    (``context.external``): a page must not need the network."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        context.external = []

        def route(route):
            url = route.request.url
            if url.startswith(("http://127.0.0.1", "data:", "blob:")):
                route.continue_()
            else:
                context.external.append(url)
                route.abort()

        context.route("**/*", route)
        try:
            yield context
        finally:
            context.close()
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
