"""The live sessions page in Chromium, against real runpop3 and daphne children."""

import poplib
from contextlib import ExitStack

import pytest

from mailadmin.mailin.delivery import deliver
from mailadmin.models import Message
from tests.browser import browser_fixture, open_staff_page, running_web, save_screenshot  # noqa: F401
from tests.conftest import redis_url_or_skip
from tests.daemons import HOST
from tests.pop3_server import PASSWORD, running_pop3

ADDRESS = "alice@example.test"
MESSAGES = 3
POP3_TIMEOUT = 10.0


def message(number: int) -> bytes:
    return f"From: bob@example.test\r\nSubject: note {number}\r\n\r\nbody {number}\r\n".encode()


def log_in(port: int) -> poplib.POP3:
    client = poplib.POP3(HOST, port, timeout=POP3_TIMEOUT)
    client.user(ADDRESS)
    client.pass_(PASSWORD)
    return client


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["embedded", "redis", "two runpop3 processes"])
def test_a_login_appears_live_and_kick_ends_it_without_its_deletions(
    setup, tmp_path, transactional_db, browser, make_mailbox
):
    from playwright.sync_api import expect

    environment = {"REDIS_URL": redis_url_or_skip()} if setup == "redis" else {}
    make_mailbox(ADDRESS)
    for number in range(MESSAGES):
        assert deliver([ADDRESS], [message(number)])[0].delivered
    first_size = Message.objects.order_by("pk").values_list("size_bytes", flat=True)[0]
    with ExitStack() as running:
        servers = [
            running.enter_context(running_pop3(tmp_path / f"pop3-{n}", **environment))
            for n in range(2 if setup == "two runpop3 processes" else 1)
        ]
        web = running.enter_context(running_web(tmp_path / "web", **environment))
        page = open_staff_page(browser, web)
        page.goto("/admin/sessions/live/")
        expect(page.locator("#live-status")).to_have_attribute("data-state", "connected")

        client = log_in(servers[-1].port)
        row = page.locator(f'#live-sessions tr[data-address="{ADDRESS}"]')
        expect(row).to_have_count(1)
        expect(row.locator("td.state")).to_have_text("logged in")
        client.dele(1)
        expect(row.locator("td.marked")).to_have_text(f"1 ({first_size} B)")
        save_screenshot(page, f"live-sessions-{setup.replace(' ', '-')}")

        page.once("dialog", lambda dialog: dialog.accept())
        row.locator("button.kick").click()
        expect(row).to_have_count(0)
        with pytest.raises((poplib.error_proto, EOFError, OSError)):
            client.noop()
        client.close()

        again = log_in(servers[0].port)
        assert again.stat()[0] == MESSAGES
        again.quit()
        page.context.close()
