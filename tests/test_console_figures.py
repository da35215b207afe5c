"""The console's figures: the hourly rollup of pruned history, the dashboard and the charts, scoped."""

import re
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from mailadmin.console import figures
from mailadmin.hosting import figures as hosting_figures
from mailadmin.hosting import history, services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuthFailure, Domain, HourlyFigures, LmtpNode, Mailbox, Pop3Node, Pop3Session
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db

EVERYONE = Actor.cli()
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def ended_session(mailbox, started_at, *, logged_in=True, retr_count=0, retr_bytes=0, **fields):
    return open_session_row(
        mailbox,
        started_at=started_at,
        ended_at=started_at + timedelta(minutes=1),
        authenticated_at=started_at if logged_in else None,
        end_reason="quit",
        retr_count=retr_count,
        retr_bytes=retr_bytes,
        **fields,
    )


def failed_login(created_at, domain=None, username="x@nowhere.test"):
    return AuthFailure.objects.create(
        created_at=created_at,
        username=username,
        domain=domain,
        peer_host="192.0.2.9",
        source="192.0.2.9",
        mechanism="USER",
        reason="bad credentials",
    )


@pytest.fixture(autouse=True)
def figures_kept_for_a_century(settings):
    """Figures from LONG_AGO outlive the prunes of a test, unless it says otherwise."""
    settings.MAILADMIN_FIGURES_DAYS = 36500


@pytest.fixture
def a_and_b(make_mailbox):
    return make_mailbox("alice@a.test", quota_bytes=1000), make_mailbox("bob@b.test", quota_bytes=1000)


@pytest.fixture
def history_rows(a_and_b):
    """Sessions and failed logins over several hours and two domains, old and recent."""
    alice, bob = a_and_b
    old = LONG_AGO.replace(hour=10)
    for minutes in (0, 5, 70):
        ended_session(alice, old + timedelta(minutes=minutes), retr_count=2, retr_bytes=300)
    ended_session(bob, old + timedelta(minutes=10), logged_in=False)
    ended_session(bob, old + timedelta(minutes=20), retr_count=1, retr_bytes=50)
    ended_session(None, old + timedelta(minutes=30), logged_in=False)  # no name given: no domain
    recent = timezone.now() - timedelta(hours=2)
    ended_session(alice, recent, retr_count=1, retr_bytes=7)
    failed_login(old + timedelta(minutes=1), alice.domain, "alice@a.test")
    failed_login(old + timedelta(minutes=2))
    failed_login(recent, bob.domain, "bob@b.test")
    return alice, bob


def all_hours() -> dict[datetime, Counter]:
    return {hour: +counts for hour, counts in figures.hourly(EVERYONE, LONG_AGO - timedelta(days=1)).items()}


# --- The rollup ------------------------------------------------------------------------------


def test_prunehistory_keeps_the_hourly_figures_equal_to_the_counts_they_summarise(history_rows):
    before = all_hours()
    ten, eleven = LONG_AGO.replace(hour=10), LONG_AGO.replace(hour=11)
    assert before[ten] == Counter(sessions=5, logins=3, retr_messages=5, retr_bytes=650, failed_logins=2)
    assert before[eleven] == Counter(sessions=1, logins=1, retr_messages=2, retr_bytes=300)

    pruned = history.prune_history(30, batch_size=2)

    assert (pruned.sessions, pruned.failures) == (6, 2)
    assert Pop3Session.objects.count() == 1 and AuthFailure.objects.count() == 1
    assert all_hours() == before
    by_domain = {
        (row.hour, row.domain.name if row.domain else None): (row.sessions, row.logins, row.failed_logins)
        for row in HourlyFigures.objects.select_related("domain")
    }
    assert by_domain == {
        (ten, "a.test"): (2, 2, 1),
        (ten, "b.test"): (2, 1, 0),
        (ten, None): (1, 0, 1),
        (eleven, "a.test"): (1, 1, 0),
    }


def test_an_hour_pruned_twice_is_counted_once(history_rows):
    before = all_hours()
    history.prune_history(30, batch_size=2)
    rolled_up = list(HourlyFigures.objects.order_by("hour", "domain_id").values())
    history.prune_history(30, batch_size=2)
    history.prune_history(0, batch_size=2)  # now the recent rows go too
    assert all_hours() == before
    assert (
        list(
            HourlyFigures.objects.filter(hour__lt=LONG_AGO.replace(hour=12))
            .order_by("hour", "domain_id")
            .values()
        )
        == rolled_up
    )


def test_a_batch_that_fails_neither_counts_nor_deletes_its_rows(history_rows, monkeypatch):
    before = all_hours()

    def roll_up_then_fail(rows):
        hosting_figures.roll_up_sessions(rows)
        raise RuntimeError("disk full")

    monkeypatch.setattr(history.figures, "roll_up_sessions", roll_up_then_fail)
    with pytest.raises(RuntimeError):
        history.prune_history(30, batch_size=2)
    assert not HourlyFigures.objects.exists()
    assert Pop3Session.objects.count() == 7
    assert all_hours() == before


def test_the_prune_leaves_the_lock_free_between_batches_as_long_as_each_batch_held_it(
    history_rows, monkeypatch
):
    """A prune that took the writer lock again at once starved a waiting writer for its whole
    busy timeout (28 s in the bench, on SQLite)."""
    events = []
    clock = iter(range(1000))
    monkeypatch.setattr(history.time, "monotonic", lambda: next(clock) * 0.03)
    monkeypatch.setattr(history.time, "sleep", lambda seconds: events.append(("pause", round(seconds, 3))))
    real_roll_up = history.figures.roll_up_sessions
    monkeypatch.setattr(
        history.figures,
        "roll_up_sessions",
        lambda rows: (events.append(("batch", len(rows))), real_roll_up(rows)),
    )
    history.prune_history(30, batch_size=4)
    assert events == [("batch", 4), ("pause", 0.03), ("batch", 2), ("pause", 0.03), ("pause", 0.03)]


def test_figures_older_than_their_retention_go_at_the_next_prune(history_rows, settings):
    settings.MAILADMIN_FIGURES_DAYS = 365
    history.prune_history(30)
    assert HourlyFigures.objects.count() == 4
    assert history.prune_history(30).figures == 4
    assert not HourlyFigures.objects.exists()


# --- Dashboard -------------------------------------------------------------------------------


@pytest.fixture
def users(settings, a_and_b):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    root = get_user_model().objects.create_superuser("root", "root@example.test", "pw")
    services.save_domain_administrator(Actor.cli(), "olivia", ["a.test"], "a long admin passphrase")
    return root, get_user_model().objects.get(username="olivia")


def shown(response) -> dict[str, str]:
    return {figure.label: figure.value for figure in response.context["dashboard_figures"]}


def busy_hour(a_and_b):
    """Now: one open session and two logins in the last hour in a.test, more in b.test; usage."""
    alice, bob = a_and_b
    now = timezone.now()
    open_session_row(alice, authenticated_at=now, retr_bytes=2048)
    ended_session(alice, now - timedelta(minutes=30))
    ended_session(alice, now - timedelta(hours=2))  # not in the last hour
    for _ in range(3):
        open_session_row(bob, authenticated_at=now, retr_bytes=10)
    failed_login(now - timedelta(minutes=5), alice.domain, "alice@a.test")
    failed_login(now - timedelta(minutes=5), bob.domain, "bob@b.test")
    failed_login(now - timedelta(minutes=5), bob.domain, "bob@b.test")
    failed_login(now - timedelta(hours=3), alice.domain, "alice@a.test")
    Mailbox.objects.filter(pk=alice.pk).update(used_bytes=850)
    Mailbox.objects.filter(pk=bob.pk).update(used_bytes=790)
    Domain.objects.filter(name="b.test").update(quota_bytes=100, used_bytes=95)
    Pop3Node.objects.create(name="h:1", started_at=now, heartbeat_at=now)
    Pop3Node.objects.create(name="h:2", started_at=now, heartbeat_at=now - timedelta(hours=1))
    LmtpNode.objects.create(name="h:3", started_at=now, heartbeat_at=now)


def test_the_dashboard_shows_what_the_rows_count_and_links_to_the_pages_behind(client, users, a_and_b):
    busy_hour(a_and_b)
    client.force_login(users[0])
    response = client.get("/admin/")
    assert response.status_code == 200
    assert shown(response) == {
        "Open POP3 sessions": "4",
        "Logins in the last hour": "5",
        "Failed logins in the last hour": "3",
        "Retrieved today": "2.0 KiB",  # 2078 bytes
        "Mailboxes over 80% of quota": "1",
        "Domains near their cap": "1",
        "runpop3 processes alive": "1",
        "runlmtp processes alive": "1",
    }
    page = response.content.decode()
    assert 'href="/admin/mailadmin/pop3session/?state=open"' in page or 'href="/admin/sessions/live/"' in page
    assert 'href="/admin/charts/"' in page
    assert page.count('<svg role="img"') == 2


def test_bytes_retrieved_today_add_rolled_up_hours_to_the_rows_left(a_and_b):
    alice, _ = a_and_b
    now = timezone.now()
    midnight = figures.start_of_day(now)
    ended_session(alice, midnight + (now - midnight) / 2, retr_bytes=100)
    ended_session(alice, midnight - timedelta(minutes=1), retr_bytes=5000)  # yesterday
    HourlyFigures.objects.create(hour=hosting_figures.hour_of(now), domain=alice.domain, retr_bytes=40)
    assert figures.dashboard(EVERYONE, now).retrieved_bytes_today == 140


def test_a_domain_administrator_sees_the_figures_of_their_domains_only(client, users, a_and_b):
    busy_hour(a_and_b)
    client.force_login(users[1])
    figures_shown = shown(client.get("/admin/"))
    assert figures_shown == {
        "Open POP3 sessions": "1",
        "Logins in the last hour": "2",
        "Failed logins in the last hour": "1",
        "Retrieved today": "2.0 KiB",
        "Mailboxes over 80% of quota": "1",
        "Domains near their cap": "0",
    }
    olivia = Actor.for_user(users[1])
    assert figures.dashboard(olivia).retrieved_bytes_today == 2048
    assert figures.dashboard(EVERYONE).retrieved_bytes_today == 2048 + 30


def test_the_dashboard_counts_open_sessions_with_the_partial_index_and_no_history_scan(users, a_and_b):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as queries:
        figures.dashboard(EVERYONE)
    session_reads = [
        sql for sql in (q["sql"] for q in queries.captured_queries) if "mailadmin_pop3session" in sql
    ]
    open_count = [sql for sql in session_reads if '"ended_at" IS NULL' in sql]
    # The open rows alone (what the partial index pop3session_open holds); the rest a window.
    assert len(open_count) == 1 and "started_at" not in open_count[0]
    assert all('"started_at" >=' in sql for sql in session_reads if sql not in open_count)
    assert len(session_reads) == 3  # open, logins in the last hour, retrieved today


# --- Charts ----------------------------------------------------------------------------------


def test_the_charts_show_the_last_week_hour_by_hour_with_a_table_for_each(client, users, a_and_b):
    alice, bob = a_and_b
    hour = hosting_figures.hour_of(timezone.now()) - timedelta(hours=5)
    for _ in range(3):
        ended_session(alice, hour + timedelta(minutes=10), retr_bytes=1000)
    ended_session(bob, hour + timedelta(minutes=20))
    HourlyFigures.objects.create(hour=hour, domain=alice.domain, sessions=4, failed_logins=6)
    Mailbox.objects.filter(pk=alice.pk).update(used_bytes=1000)  # full
    Mailbox.objects.filter(pk=bob.pk).update(used_bytes=150)

    client.force_login(users[0])
    response = client.get("/admin/charts/")
    assert response.status_code == 200
    sessions, retrieved, failed, quota = response.context["charts"]
    assert len(sessions.bars) == 7 * 24
    assert [bar.value_text for bar in sessions.bars if bar.value_text != "0"] == ["8"]
    assert [bar.value_text for bar in failed.bars if bar.value_text != "0"] == ["6"]
    assert sum(bar.height > 0 for bar in retrieved.bars) == 1
    assert [(bar.label, bar.value_text) for bar in quota.bars if bar.value_text != "0"] == [
        ("10–19 %", "1"),
        ("full", "1"),
    ]
    page = response.content.decode()
    assert page.count('<svg role="img"') == 4
    assert '<title id="sessions-per-hour-title">POP3 sessions per hour</title>' in page
    assert "<td>8</td>" in page  # the table fallback

    client.force_login(users[1])
    sessions, _, failed, quota = client.get("/admin/charts/").context["charts"]
    assert [bar.value_text for bar in sessions.bars if bar.value_text != "0"] == ["7"]
    assert [(bar.label, bar.value_text) for bar in quota.bars if bar.value_text != "0"] == [("full", "1")]


def test_the_charts_need_a_staff_login(client):
    response = client.get("/admin/charts/")
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_bar_heights_are_to_scale():
    from mailadmin.console.charts import bar_chart

    chart = bar_chart(
        "c", "t", description="d", x_label="x", y_label="y", points=[("a", 1), ("b", 4), ("c", 0)]
    )
    heights = [bar.height for bar in chart.bars]
    assert heights[2] == 0 and heights[1] == pytest.approx(4 * heights[0])
    assert [tick.text for tick in chart.y_ticks] == ["0", "1", "2", "3", "4"]
    assert re.fullmatch(r"[0-9.]+", str(chart.bars[0].x))


def test_each_batch_is_sized_from_how_long_the_last_one_took(history_rows, monkeypatch):
    """Unsized, the first batch takes FIRST_BATCH_SIZE rows, and each next one as many as the
    last batch's pace would fit in BATCH_SECONDS (a fixed 250 rows held SQLite's lock 107 ms)."""
    took = iter([0.12, 0.01])  # the first batch four times too slow, the second three times too quick
    now = [0.0]

    def monotonic() -> float:
        return now[0]

    def roll_up(rows):
        sizes.append(len(rows))
        now[0] += next(took, 0.0)
        real_roll_up(rows)

    sizes: list[int] = []
    real_roll_up = history.figures.roll_up_sessions
    monkeypatch.setattr(history.time, "monotonic", monotonic)
    monkeypatch.setattr(history.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(history.figures, "roll_up_sessions", roll_up)
    monkeypatch.setattr(history, "BATCH_SECONDS", 0.03)
    monkeypatch.setattr(history, "FIRST_BATCH_SIZE", 4)
    monkeypatch.setattr(history, "MIN_BATCH_SIZE", 1)
    history.prune_history(30)
    # 4 rows in 0.12 s: 1 would take 0.03 s; 1 row in 0.01 s: 3 would, but at most twice as many
    # (2, of which 1 is left). A fixed size of 4 would have made [4, 2].
    assert sizes == [4, 1, 1]
    assert history.next_batch_size(2, 0.01) == 4
    assert history.next_batch_size(100, 0.3) == 10
    assert history.next_batch_size(5, 1.0) == history.MIN_BATCH_SIZE
    assert history.next_batch_size(4000, 0.001) == history.MAX_BATCH_SIZE
    assert history.next_batch_size(4000, 0.0) == history.MAX_BATCH_SIZE
