"""The history page: ended sessions and failed logins by every filter, pages cut by position, the
top failing sources, a mailbox's last login, and a domain administrator's view of it all."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from mailadmin.console import history
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuthFailure, Domain, Mailbox, Pop3Session
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

HISTORY = "/admin/history/"
DAY = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def make_mailbox(address: str) -> Mailbox:
    return services.create_mailbox(Actor.cli(), address, password="a long test passphrase").mailbox


def ended(name: str, mailbox: Mailbox | None = None, *, at=DAY, reason="quit", peer="192.0.2.1", **fields):
    """An ended session row, named by its node so a test can tell rows apart."""
    times = {"started_at": at, "ended_at": at + timedelta(minutes=1)}
    return open_session_row(mailbox, node=name, end_reason=reason, peer_host=peer, **times, **fields)


def failed(name: str, username: str, *, at=DAY, peer="192.0.2.9", source=None, reason="bad credentials"):
    domain = Domain.objects.filter(name=username.rpartition("@")[2]).first()
    return AuthFailure.objects.create(
        created_at=at,
        username=username,
        domain=domain,
        peer_host=peer,
        source=source or peer,
        mechanism=name,  # names the row for the test
        reason=reason,
    )


@pytest.fixture
def sessions(domains):
    alice, bob = make_mailbox("alice@ours.test"), make_mailbox("bob@theirs.test")
    ended("a-quit", alice)
    ended("a-kicked", alice, reason="kicked", at=DAY - timedelta(days=2))
    ended("a-other-client", alice, peer="198.51.100.4", at=DAY - timedelta(hours=1))
    ended("b-timeout", bob, reason="timeout", at=DAY + timedelta(days=1))
    ended("tried-ours", None, username="nobody@ours.test", domain=domains[0], at=DAY + timedelta(minutes=1))
    open_session_row(alice, node="still-open", started_at=DAY)
    return alice, bob


@pytest.fixture
def failures(domains):
    failed("f-alice", "alice@ours.test")
    failed("f-alice-old", "alice@ours.test", at=DAY - timedelta(days=3), reason="mailbox in use")
    failed("f-v6", "carol@ours.test", peer="2001:db8:1:2::5", source="2001:db8:1::/48")
    failed("f-bob", "bob@theirs.test")
    failed("f-stranger", "x@elsewhere.test")


def shown(response) -> list[str]:
    """The rows of the page, newest first, by the name each test gave them."""
    assert response.status_code == 200, response.content[:300]
    return [getattr(row, "node", None) or row.mechanism for row in response.context["rows"]]


def test_ended_sessions_newest_first_without_open_ones(root_client, sessions):
    expected = ["b-timeout", "tried-ours", "a-quit", "a-other-client", "a-kicked"]
    assert shown(root_client.get(HISTORY)) == expected


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"address": "alice@ours.test"}, ["a-quit", "a-other-client", "a-kicked"]),
        ({"domain": "ours.test"}, ["tried-ours", "a-quit", "a-other-client", "a-kicked"]),
        ({"domain": "OURS.test"}, ["tried-ours", "a-quit", "a-other-client", "a-kicked"]),
        ({"client": "198.51.100.4"}, ["a-other-client"]),
        ({"reason": "kicked"}, ["a-kicked"]),
        ({"since": "2026-11-20"}, ["b-timeout", "tried-ours", "a-quit", "a-other-client"]),
        ({"until": "2026-11-20"}, ["tried-ours", "a-quit", "a-other-client", "a-kicked"]),
        ({"since": "2026-11-20", "until": "2026-11-20"}, ["tried-ours", "a-quit", "a-other-client"]),
        ({"domain": "ours.test", "reason": "quit", "client": "192.0.2.1"}, ["tried-ours", "a-quit"]),
        ({"address": "nobody@ours.test"}, ["tried-ours"]),
    ],
)
def test_each_session_filter_returns_exactly_its_rows(root_client, sessions, filters, expected):
    assert shown(root_client.get(HISTORY, filters)) == expected


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["f-stranger", "f-bob", "f-v6", "f-alice", "f-alice-old"]),
        ({"address": "alice@ours.test"}, ["f-alice", "f-alice-old"]),
        ({"domain": "theirs.test"}, ["f-bob"]),
        ({"client": "2001:db8:1:2::5"}, ["f-v6"]),
        ({"client": "2001:db8:1::/48"}, ["f-v6"]),
        ({"reason": "mailbox in use"}, ["f-alice-old"]),
        ({"since": "2026-11-19"}, ["f-stranger", "f-bob", "f-v6", "f-alice"]),
        ({"until": "2026-11-17"}, ["f-alice-old"]),
    ],
)
def test_each_failed_login_filter_returns_exactly_its_rows(root_client, failures, filters, expected):
    assert shown(root_client.get(HISTORY, {"kind": "failures", **filters})) == expected


def test_pages_follow_each_other_by_position_with_no_row_lost_or_repeated(root_client, domains, monkeypatch):
    monkeypatch.setattr(history, "PAGE_SIZE", 3)
    mailbox = make_mailbox("alice@ours.test")
    for n in range(7):  # two pairs share a start time: the key breaks the tie
        ended(f"s{n}", mailbox, at=DAY + timedelta(seconds=n // 2 * 2), id=uuid.UUID(int=n + 1))
    first = root_client.get(HISTORY)
    assert shown(first) == ["s6", "s5", "s4"]
    assert first.context["newer"] is False
    second = root_client.get(f"{HISTORY}?{first.context['older']}")
    assert shown(second) == ["s3", "s2", "s1"]
    third = root_client.get(f"{HISTORY}?{second.context['older']}")
    assert shown(third) == ["s0"]
    assert third.context["older"] is False
    back = root_client.get(f"{HISTORY}?{third.context['newer']}")
    assert shown(back) == ["s3", "s2", "s1"]
    assert shown(root_client.get(f"{HISTORY}?{back.context['newer']}")) == ["s6", "s5", "s4"]


def test_a_page_position_keeps_the_filters(root_client, domains, monkeypatch):
    monkeypatch.setattr(history, "PAGE_SIZE", 1)
    mailbox = make_mailbox("alice@ours.test")
    ended("k1", mailbox, reason="kicked")
    ended("q", mailbox, at=DAY - timedelta(hours=1))
    ended("k2", mailbox, reason="kicked", at=DAY - timedelta(hours=2))
    first = root_client.get(HISTORY, {"reason": "kicked"})
    assert shown(first) == ["k1"]
    assert shown(root_client.get(f"{HISTORY}?{first.context['older']}")) == ["k2"]


@pytest.mark.parametrize(
    "filters",
    [
        {"since": "yesterday"},
        {"before": "not-a-position"},
        {"before": "2026-11-20T12:00:00+00:00_not-a-uuid"},
        {"reason": "no such reason"},
        {"kind": "everything"},
    ],
)
def test_malformed_filters_are_a_bad_request(root_client, domains, filters):
    assert root_client.get(HISTORY, filters).status_code == 400


def test_top_failing_sources_of_the_last_24_hours(root_client, domains):
    now = timezone.now()
    for n, name in enumerate(["a@ours.test", "b@ours.test", "a@ours.test"]):
        failed(f"x{n}", name, at=now - timedelta(minutes=n), peer="203.0.113.5")
    failed("y", "a@ours.test", at=now - timedelta(hours=1), peer="203.0.113.6")
    failed("old", "a@ours.test", at=now - timedelta(hours=25), peer="203.0.113.6")
    failed("old2", "a@ours.test", at=now - timedelta(hours=25), peer="203.0.113.6")
    top = root_client.get(HISTORY).context["top_sources"]
    assert [(row["source"], row["failures"], row["names"]) for row in top] == [
        ("203.0.113.5", 3, 2),
        ("203.0.113.6", 1, 1),
    ]
    assert top[0]["last_seen"] == now
    page = root_client.get(HISTORY).content.decode()
    assert '<a href="?kind=failures&amp;client=203.0.113.5">203.0.113.5</a>' in page


def test_filtered_by_a_mailbox_the_page_shows_its_last_login(root_client, domains):
    mailbox = make_mailbox("alice@ours.test")
    moment = datetime(2026, 11, 21, 8, 30, tzinfo=UTC)
    Mailbox.objects.filter(pk=mailbox.pk).update(last_login_at=moment, last_login_from="192.0.2.44")
    response = root_client.get(HISTORY, {"address": "alice@ours.test"})
    assert response.context["mailbox"].pk == mailbox.pk
    assert "Nov. 21, 2026, 8:30 a.m. from 192.0.2.44" in response.content.decode()
    make_mailbox("new@ours.test")
    page = " ".join(root_client.get(HISTORY, {"address": "new@ours.test"}).content.decode().split())
    assert "Last successful POP3 login: never" in page
    assert root_client.get(HISTORY, {"address": "ghost@ours.test"}).context["mailbox"] is None


def test_the_mailbox_list_and_page_show_the_last_login(root_client, domains):
    mailbox = make_mailbox("alice@ours.test")
    make_mailbox("new@ours.test")
    moment = datetime(2026, 11, 21, 8, 30, tzinfo=UTC)
    Mailbox.objects.filter(pk=mailbox.pk).update(last_login_at=moment, last_login_from="192.0.2.44")
    page = root_client.get("/admin/mailadmin/mailbox/").content.decode()
    assert '<td class="field-last_login">Nov. 21, 2026, 8:30 a.m. from 192.0.2.44</td>' in page
    assert '<td class="field-last_login">never</td>' in page
    assert "o=6" in root_client.get("/admin/mailadmin/mailbox/?o=6").wsgi_request.get_full_path()
    change = root_client.get(f"/admin/mailadmin/mailbox/{mailbox.pk}/change/").content.decode()
    assert "Nov. 21, 2026, 8:30 a.m. from 192.0.2.44" in change
    assert '<a href="/admin/history/?address=alice%40ours.test">sessions and failed logins</a>' in change


def test_the_page_needs_the_view_permissions(plain_staff_client, domains):
    assert plain_staff_client.get(HISTORY).status_code == 403
    sam = plain_staff_client.get(HISTORY).wsgi_request.user
    sam.user_permissions.add(Permission.objects.get(codename="view_pop3session"))
    response = plain_staff_client.get(HISTORY)
    assert response.status_code == 200
    assert response.context["top_sources"] is None
    assert plain_staff_client.get(HISTORY, {"kind": "failures"}).status_code == 403


# --- A domain administrator --------------------------------------------------------------------


def test_a_domain_administrator_sees_only_their_domains_rows(ours_client, sessions, failures):
    assert shown(ours_client.get(HISTORY)) == ["tried-ours", "a-quit", "a-other-client", "a-kicked"]
    response = ours_client.get(HISTORY, {"kind": "failures"})
    assert sorted(shown(response)) == ["f-alice", "f-alice-old", "f-v6"]
    assert shown(ours_client.get(HISTORY, {"client": "192.0.2.1", "reason": "timeout"})) == []


def test_a_domain_administrators_top_sources_count_only_their_domains(ours_client, domains):
    now = timezone.now()
    failed("ours", "a@ours.test", at=now, peer="203.0.113.5")
    failed("theirs", "b@theirs.test", at=now, peer="203.0.113.5")
    failed("theirs2", "c@theirs.test", at=now, peer="203.0.113.7")
    top = ours_client.get(HISTORY).context["top_sources"]
    assert [(row["source"], row["failures"], row["names"]) for row in top] == [("203.0.113.5", 1, 1)]


@pytest.mark.parametrize(
    "filters",
    [
        {"domain": "theirs.test"},
        {"domain": "nowhere.test"},
        {"address": "bob@theirs.test"},
        {"address": "ghost@nowhere.test"},
        {"address": "no-domain-at-all"},
        {"kind": "failures", "domain": "theirs.test"},
        {"kind": "failures", "address": "bob@theirs.test"},
        {"domain": "theirs.test", "before": f"2026-11-20T12:00:00+00:00_{uuid.UUID(int=1)}"},
    ],
)
def test_a_domain_administrator_gets_404_for_another_domain_by_any_filter(ours_client, sessions, filters):
    assert ours_client.get(HISTORY, filters).status_code == 404


def test_a_position_from_another_domain_reveals_nothing(ours_client, sessions, monkeypatch):
    monkeypatch.setattr(history, "PAGE_SIZE", 1)
    theirs = Pop3Session.objects.get(node="b-timeout")
    position = f"{theirs.started_at.isoformat()}_{theirs.pk}"
    assert shown(ours_client.get(HISTORY, {"before": position})) == ["tried-ours"]


def test_a_tab_keeps_the_filters_but_not_the_other_kinds_reason(root_client, domains):
    filters = {"kind": "failures", "reason": "bad credentials", "domain": "ours.test"}
    response = root_client.get(HISTORY, filters)
    link = response.context["kinds"]["sessions"]
    assert link == "kind=sessions&reason=&domain=ours.test"
    assert root_client.get(f"{HISTORY}?{link}").status_code == 200


def test_the_mailbox_list_filters_by_a_domain_typed_by_name(root_client, domains):
    make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    response = root_client.get("/admin/mailadmin/mailbox/", {"domain": "Theirs.test", "o": "1"})
    assert [mailbox.address for mailbox in response.context["cl"].result_list] == ["b@theirs.test"]
    page = response.content.decode()
    assert '<input type="hidden" name="o" value="1">' in page
    assert '<input name="domain" value="Theirs.test"' in page
    assert root_client.get("/admin/mailadmin/mailbox/", {"domain": "nowhere.test"}).status_code == 404


def test_a_domain_administrators_mailbox_list_refuses_another_domain(ours_client, domains):
    make_mailbox("a@ours.test")
    make_mailbox("b@theirs.test")
    response = ours_client.get("/admin/mailadmin/mailbox/", {"domain": "ours.test"})
    assert [mailbox.address for mailbox in response.context["cl"].result_list] == ["a@ours.test"]
    assert ours_client.get("/admin/mailadmin/mailbox/", {"domain": "theirs.test"}).status_code == 404
