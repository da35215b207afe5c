"""The dashboard, the quota page and the charts in Chromium, showing seeded figures.

The data goes in through the store and the services (mailboxes, deliveries, quotas, a domain
administrator) and as rows the way runpop3 and ``prunehistory`` write them (sessions, failed
logins, rolled-up hours). Each test saves screenshots under ``var/test-artifacts/`` (or
``SCREENSHOT_DIR``); ``live-sessions.png`` comes from a real runpop3 child and poplib clients.
"""

import poplib
from datetime import timedelta

import pytest
from django.utils import formats, timezone

from mailadmin.console.figures import start_of_day
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.figures import hour_of
from mailadmin.mailin.delivery import deliver
from mailadmin.models import AuthFailure, Domain, HourlyFigures, Mailbox
from mailadmin.units import format_size
from tests.browser import (  # noqa: F401
    browser_fixture,
    open_staff_page,
    running_web,
    save_screenshot,
    staff_page_fixture,
    web_server_fixture,
)
from tests.conftest import open_session_row
from tests.daemons import HOST
from tests.pop3_server import PASSWORD, running_pop3

EVERYONE = Actor.cli()
# The width of the README's screenshots.
SHOT_VIEWPORT = {"width": 1280, "height": 800}
ADMIN_NAME = "nadia"
ADMIN_PASSWORD = "a long admin passphrase"
# address -> per cent of its byte quota used (None: no quota)
USE = {
    "ann@north.test": 97,
    "dan@south.test": 85,
    "ben@north.test": 50,
    "cat@north.test": 12,
    "eve@south.test": None,
}
NORTH_CAP_PERCENT = 90
ROLLED_UP_SESSIONS = 6


def message(kilobytes: int) -> bytes:
    line = b"x" * 62 + b"\r\n"
    return b"From: sender@example.test\r\nSubject: seeded\r\n\r\n" + line * (kilobytes * 16)


def quota_for(used: int, percent: int) -> int:
    """A quota that ``used`` bytes fill to exactly ``percent`` % (rounded down, as the page does)."""
    quota = used * 100 // percent
    assert used * 100 // quota == percent
    return quota


@pytest.fixture
def seeded(transactional_db, make_mailbox):
    """Two domains, five mailboxes at various use, recent sessions and failed logins, an older
    rolled-up hour, and an administrator of north.test."""
    services.create_domain(EVERYONE, "north.test")
    services.create_domain(EVERYONE, "south.test", quota_bytes=100 * 1024 * 1024)
    for kilobytes, address in enumerate(USE, start=2):
        make_mailbox(address)
        assert deliver([address], [message(kilobytes * 3)])[0].delivered
    for address, percent in USE.items():
        if percent is not None:
            used = Mailbox.objects.get(user__username=address).used_bytes
            services.update_mailbox(EVERYONE, address, quota_bytes=quota_for(used, percent))
    north = Domain.objects.get(name="north.test")
    services.update_domain(EVERYONE, "north.test", quota_bytes=quota_for(north.used_bytes, NORTH_CAP_PERCENT))
    south = Domain.objects.get(name="south.test")

    mailboxes = {mailbox.address: mailbox for mailbox in Mailbox.objects.select_related("domain", "user")}
    now = timezone.now()
    # Within the last hour, today, and in the same hour as the open session below.
    recent = max(now - timedelta(minutes=5), start_of_day(now), hour_of(now))
    for address, retrieved in (("ann@north.test", 3000), ("ben@north.test", 1000), ("dan@south.test", 500)):
        open_session_row(
            mailboxes[address],
            started_at=recent,
            authenticated_at=recent,
            ended_at=recent + timedelta(minutes=1),
            end_reason="quit",
            retr_count=1,
            retr_bytes=retrieved,
        )
    open_session_row(mailboxes["ann@north.test"], started_at=recent, authenticated_at=recent)
    for username, domain in (("ann@north.test", north), ("cat@north.test", north), ("dan@south.test", south)):
        AuthFailure.objects.create(
            created_at=recent,
            username=username,
            domain=domain,
            peer_host="192.0.2.9",
            source="192.0.2.9",
            mechanism="USER",
            reason="bad credentials",
        )
    two_days_ago = hour_of(now - timedelta(days=2))
    HourlyFigures.objects.create(
        hour=two_days_ago,
        domain=north,
        sessions=ROLLED_UP_SESSIONS,
        logins=5,
        retr_messages=4,
        retr_bytes=8192,
    )
    services.save_domain_administrator(EVERYONE, ADMIN_NAME, ["north.test"], ADMIN_PASSWORD)
    return {"recent": recent, "rolled_up_hour": two_days_ago, "mailboxes": mailboxes}


def hour_label(moment) -> str:
    return formats.date_format(timezone.localtime(hour_of(moment)), "D H:i")


def tile(page, label: str):
    named = page.locator(".label").get_by_text(label, exact=True)
    return page.locator("#console-dashboard .console-figures > *", has=named).locator(".value")


def usage_text(mailbox: Mailbox) -> str:
    percent = mailbox.used_bytes * 100 // mailbox.quota_bytes
    return f"{format_size(mailbox.used_bytes)} / {format_size(mailbox.quota_bytes)} ({percent} %)"


def mailbox_addresses(page):
    return page.locator("#mailbox-usage tbody tr td:first-child")


def test_the_dashboard_shows_the_seeded_figures(seeded, staff_page):
    from playwright.sync_api import expect

    staff_page.set_viewport_size(SHOT_VIEWPORT)
    staff_page.goto("/admin/")
    expect(tile(staff_page, "Open POP3 sessions")).to_have_text("1")
    expect(tile(staff_page, "Logins in the last hour")).to_have_text("4")
    expect(tile(staff_page, "Failed logins in the last hour")).to_have_text("3")
    expect(tile(staff_page, "Retrieved today")).to_have_text("4.4 KiB")
    expect(tile(staff_page, "Mailboxes over 80% of quota")).to_have_text("2")
    expect(tile(staff_page, "Domains near their cap")).to_have_text("1")
    expect(tile(staff_page, "runpop3 processes alive")).to_have_text("0")
    label = hour_label(seeded["recent"])
    expect(
        staff_page.locator("#console-dashboard #sessions-per-hour rect title", has_text=label)
    ).to_have_text(f"{label}: 4")
    expect(
        staff_page.locator("#console-dashboard #failed-logins-per-hour rect title", has_text=label)
    ).to_have_text(f"{label}: 3")
    save_screenshot(staff_page, "dashboard")


def test_the_quota_page_lists_every_mailbox_by_use_and_filters_over_80(seeded, staff_page):
    from playwright.sync_api import expect

    mailboxes = seeded["mailboxes"]
    for mailbox in mailboxes.values():
        mailbox.refresh_from_db()
    staff_page.set_viewport_size(SHOT_VIEWPORT)
    staff_page.goto("/admin/quota/")
    expect(mailbox_addresses(staff_page)).to_have_text(list(USE))
    rows = staff_page.locator("#mailbox-usage tbody tr")
    expect(rows.nth(0).locator("td").nth(1)).to_have_text("97 %")
    expect(rows.nth(0).locator("td").nth(2)).to_contain_text(usage_text(mailboxes["ann@north.test"]))
    expect(rows.nth(1).locator("td").nth(1)).to_have_text("85 %")
    expect(rows.nth(4).locator("td").nth(1)).to_have_text("unlimited")
    domains = staff_page.locator("#domain-totals tbody tr")
    expect(domains.locator("td:first-child")).to_have_text(["north.test", "south.test"])
    expect(domains.nth(0).locator("td").nth(1)).to_have_text("3")
    expect(domains.nth(0).locator("td").nth(3)).to_contain_text(f"({NORTH_CAP_PERCENT} %)")
    expect(staff_page.locator(".paginator").last).to_contain_text("(5 mailboxes)")
    save_screenshot(staff_page, "quota")

    staff_page.goto("/admin/quota/?over=80")
    expect(mailbox_addresses(staff_page)).to_have_text(["ann@north.test", "dan@south.test"])
    expect(staff_page.locator("select[name=over]")).to_have_value("80")
    save_screenshot(staff_page, "quota-over-80")


def test_the_charts_show_the_seeded_hours_and_the_quota_histogram(seeded, staff_page):
    from playwright.sync_api import expect

    staff_page.goto("/admin/charts/")
    rolled_up = seeded["rolled_up_hour"]
    label = hour_label(rolled_up)
    recent_label = hour_label(seeded["recent"])
    sessions = staff_page.locator("#sessions-per-hour rect title")
    expect(sessions).to_have_count(7 * 24)
    expect(sessions.filter(has_text=label)).to_have_text(f"{label}: {ROLLED_UP_SESSIONS}")
    expect(sessions.filter(has_text=recent_label)).to_have_text(f"{recent_label}: 4")
    failures = staff_page.locator("#failed-logins-per-hour rect title")
    expect(failures.filter(has_text=recent_label)).to_have_text(f"{recent_label}: 3")
    day = formats.date_format(timezone.localtime(rolled_up).replace(hour=0), "D j")
    expect(staff_page.locator("#retrieved-per-day rect title", has_text=day)).to_have_text(f"{day}: 8.0 KiB")
    expect(staff_page.locator("#quota-use rect title")).to_have_text(
        [
            "0–9 %: 0",
            "10–19 %: 1",
            "20–29 %: 0",
            "30–39 %: 0",
            "40–49 %: 0",
            "50–59 %: 1",
            "60–69 %: 0",
            "70–79 %: 0",
            "80–89 %: 1",
            "90–99 %: 1",
            "full: 0",
        ]
    )
    save_screenshot(staff_page, "charts")


def test_a_domain_administrator_sees_only_their_domains_figures_and_rows(seeded, browser, web_server):
    from playwright.sync_api import expect

    page = open_staff_page(browser, web_server, username=ADMIN_NAME, password=ADMIN_PASSWORD)
    page.goto("/admin/")
    expect(tile(page, "Open POP3 sessions")).to_have_text("1")
    expect(tile(page, "Logins in the last hour")).to_have_text("3")
    expect(tile(page, "Failed logins in the last hour")).to_have_text("2")
    expect(tile(page, "Retrieved today")).to_have_text("3.9 KiB")
    expect(tile(page, "Mailboxes over 80% of quota")).to_have_text("1")
    expect(tile(page, "Domains near their cap")).to_have_text("1")
    expect(page.locator("#console-dashboard .console-figures")).not_to_contain_text("runpop3 processes alive")
    save_screenshot(page, "dashboard-domain-administrator")

    page.goto("/admin/quota/")
    expect(mailbox_addresses(page)).to_have_text(["ann@north.test", "ben@north.test", "cat@north.test"])
    expect(page.locator("#domain-totals tbody td:first-child")).to_have_text(["north.test"])
    expect(page.locator("#content-main")).not_to_contain_text("south.test")
    save_screenshot(page, "quota-domain-administrator")
    page.context.close()


@pytest.mark.slow
def test_the_live_sessions_page_lists_clients_held_open(seeded, tmp_path, browser):
    """Two poplib clients logged in to a runpop3 child, as the live page shows them."""
    from playwright.sync_api import expect

    clients = []
    with running_pop3(tmp_path / "pop3") as pop3, running_web(tmp_path / "web") as web:
        page = open_staff_page(browser, web)
        page.set_viewport_size(SHOT_VIEWPORT)
        page.goto("/admin/sessions/live/")
        expect(page.locator("#live-status")).to_have_attribute("data-state", "connected")
        for address in ("ben@north.test", "dan@south.test"):
            services.set_password(EVERYONE, address, PASSWORD)
            client = poplib.POP3(HOST, pop3.port, timeout=10)
            client.user(address)
            client.pass_(PASSWORD)
            clients.append(client)
        clients[0].retr(1)
        clients[1].dele(1)
        for address in ("ben@north.test", "dan@south.test"):
            row = page.locator(f'#live-sessions tr[data-address="{address}"]')
            expect(row.locator("td.state")).to_have_text("logged in")
        dan_size = seeded["mailboxes"]["dan@south.test"].used_bytes
        expect(page.locator('#live-sessions tr[data-address="dan@south.test"] td.marked')).to_have_text(
            f"1 ({format_size(dan_size)})"
        )
        save_screenshot(page, "live-sessions")
        for client in clients:
            client.quit()
        page.context.close()
