"""Browser tests of the console: a real daphne child on the test database, driven by Chromium.

What a test module needs, imported from here (importing a fixture makes it available)::

    from tests.browser import browser_fixture, staff_page_fixture, web_server_fixture  # noqa: F401

* ``web_server``: one ``manage.py runserver`` child (daphne, since daphne is an installed app)
  on a free port against the test database, for one test. ``running_web(directory, **env)``
  runs one with other settings (``REDIS_URL``, ...) for a ``with`` block. ``WebProcess.url(path)``.
* ``browser``: a headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright; no
  browser download). The test is skipped, saying why, when Playwright or Chromium is missing.
* ``staff_page``: a Playwright page signed in to the admin of ``web_server`` as a superuser,
  through the login form. ``open_staff_page(browser, web)`` does the same for any web child.
* ``save_screenshot(page, name)``: a full-page PNG under ``var/test-artifacts/`` (git-ignored),
  or under ``SCREENSHOT_DIR`` when that is set, kept after the run; the path is returned.

Playwright's sync API keeps an event loop marked as running in the test's thread while a
browser is open; Django would then refuse the test's own (synchronous, safe) ORM calls, so the
``browser`` fixture sets DJANGO_ALLOW_ASYNC_UNSAFE for its test (server children started through
``child_environment`` do not inherit it). The browser lives for one test only: the marked loop
would otherwise break later tests that call ``asyncio.run``.
"""

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connections

from tests.conftest import PROJECT_DIR
from tests.daemons import HOST, STARTUP_TIMEOUT, DaemonProcess, free_port, running_daemon, start_daemon

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS_DIR = PROJECT_DIR / "var" / "test-artifacts"
STAFF_USERNAME = "console-root"
STAFF_PASSWORD = "a console passphrase"
# Generous: two cores shared by many processes; a wait ends as soon as its condition holds.
EXPECT_TIMEOUT_MS = 20_000


@dataclass
class WebProcess(DaemonProcess):
    """One daphne child serving mailadmin.asgi (HTTP and websockets) on ``port``."""

    command = "runserver"

    port: int

    def label(self) -> str:
        return f"daphne on port {self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"


def _wait_until_accepting(port: int) -> None:
    """runserver prints its banner before daphne binds: wait for the port itself."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"daphne did not start listening on port {port}") from None
            time.sleep(0.1)


def _start(directory: Path, environment: dict[str, str], attempt: int) -> WebProcess:
    port = free_port()
    web = start_daemon(
        WebProcess,
        ["--noreload", f"{HOST}:{port}"],
        stderr_path=directory / f"daphne-{port}-{attempt}.stderr",
        environment=environment,
        ready=[f"server at http://{HOST}:{port}/"],
        port=port,
    )
    try:
        _wait_until_accepting(port)
    except RuntimeError:
        web.process.kill()
        raise
    return web


def running_web(directory: Path, **environment: str) -> AbstractContextManager[WebProcess]:
    """Run daphne on the test database for a ``with`` block; it must exit 0 on SIGTERM."""
    return running_daemon(directory, lambda attempt: _start(directory, environment, attempt))


@pytest.fixture(name="web_server")
def web_server_fixture(tmp_path: Path, transactional_db) -> Iterator[WebProcess]:
    with running_web(tmp_path / "web") as web:
        yield web


@contextmanager
def headless_chromium() -> Iterator["object"]:
    """A headless Chromium for a ``with`` block; skips when Playwright or Chromium is missing.

    While it is open, Playwright marks an event loop as running in this thread, and Django then
    hands the block's ORM calls connections of their own, apart from the thread's: pytest-django
    closes only the thread's after a test. Those are closed here, on the way out, or they would
    outlive the test, and the next browser test would find them ended by a test since then.
    """
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -r requirements-dev.txt)")
    if not (CHROMIUM.exists() or shutil.which("chromium")):
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (make system-deps installs Debian's)")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
            connections.close_all()


@pytest.fixture(name="browser")
def browser_fixture(monkeypatch) -> Iterator["object"]:
    """A headless Chromium for one test (``headless_chromium``)."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with headless_chromium() as browser:
        yield browser


def make_staff_user():
    """The superuser the staff page signs in as (made once per test database)."""
    users = get_user_model().objects
    if not users.filter(username=STAFF_USERNAME).exists():
        users.create_superuser(STAFF_USERNAME, "root@example.test", STAFF_PASSWORD)


def open_staff_page(
    browser, web: WebProcess, *, username: str = STAFF_USERNAME, password: str = STAFF_PASSWORD
):
    """A new page of its own browser context, signed in to ``web``'s admin through the login form.

    With the default credentials the superuser is made first; other users must exist already.
    """
    from playwright.sync_api import expect

    if username == STAFF_USERNAME:
        make_staff_user()
    context = browser.new_context(base_url=web.url(), viewport={"width": 1400, "height": 900})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    page = context.new_page()
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    expect(page.locator("#user-tools")).to_be_visible()
    return page


@pytest.fixture(name="staff_page")
def staff_page_fixture(browser, web_server: WebProcess):
    page = open_staff_page(browser, web_server)
    yield page
    page.context.close()


def save_screenshot(page, name: str) -> Path:
    """A full-page screenshot kept as a test artifact: ``var/test-artifacts/<name>.png``, or
    ``$SCREENSHOT_DIR/<name>.png`` when that is set."""
    directory = Path(os.environ.get("SCREENSHOT_DIR") or ARTIFACTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
