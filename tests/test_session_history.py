"""Session and failed-login rows for a console: their domain, a change marker, an open index, pruning."""

import asyncio
import contextlib
import gc
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import figures, services
from mailadmin.hosting.actors import Actor, ActorKind
from mailadmin.hosting.history import Pruned, prune_history
from mailadmin.models import AuditEntry, AuthFailure, Domain, Pop3Node, Pop3Session
from mailadmin.pop3d import registry
from mailadmin.pop3d.authenticator import record_failure
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.maildrop import OrmMaildrop
from pop3.mailbox import ConnectionInfo, EndReason, LoginFailure, LoginRequest, SessionStats

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


class FakeSession:
    def kick(self, reason: EndReason) -> bool:
        return True


def monitor() -> registry.Pop3Monitor:
    executor = BoundedExecutor(1, "test-db")
    leases = LeaseKeeper(executor, node="testhost:1", ttl_seconds=60)
    return registry.Pop3Monitor(executor, leases, node="testhost:1", interval=1.0, on_give_up=lambda: None)


def opened(pop3_monitor: registry.Pop3Monitor) -> registry.SessionRecorder:
    recorder = pop3_monitor.recorder(FakeSession())
    recorder.opened(ConnectionInfo(("192.0.2.7", 40000), ("192.0.2.1", 110), False, uuid.uuid4().hex))
    return recorder


def row(recorder: registry.SessionRecorder) -> Pop3Session:
    return Pop3Session.objects.get(pk=recorder.session_id)


@pytest.mark.django_db(transaction=True)
def test_a_session_row_carries_the_domain_of_its_login_or_of_the_name_tried(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    other = Domain.objects.create(name="other.test")
    pop3 = monitor()
    tried_ours, tried_unknown, tried_no_domain, logged_in = (opened(pop3) for _ in range(4))
    asyncio.run(pop3.tick())
    tried_ours.login_failed("Bob@OTHER.test", LoginFailure.BAD_CREDENTIALS, "USER")
    tried_unknown.login_failed("bob@unknown.test", LoginFailure.BAD_CREDENTIALS, "USER")
    tried_no_domain.login_failed("bob", LoginFailure.BAD_CREDENTIALS, "USER")
    logged_in.login_failed("alice@other.test", LoginFailure.BAD_CREDENTIALS, "USER")
    logged_in.logged_in(
        "alice@example.test", "USER", OrmMaildrop(pop3.executor, pop3.leases.lease(mailbox.pk), [])
    )
    outbox = pop3.outbox

    with CaptureQueriesContext(connection) as queries:
        registry.write_session_rows(outbox)

    statements = [query["sql"].split()[0] for query in queries.captured_queries]
    # One per session row, and one for the mailbox's last login.
    assert statements.count("UPDATE") == 5 and "SELECT" not in statements
    assert [row(r).domain_id for r in (tried_ours, tried_unknown, tried_no_domain, logged_in)] == [
        other.pk,
        None,
        None,
        mailbox.domain_id,
    ]
    assert row(logged_in).mailbox_id == mailbox.pk


@pytest.mark.django_db(transaction=True)
def test_a_login_becomes_the_mailboxs_last_login_and_outlives_its_pruned_session_row(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    pop3 = monitor()
    recorder = opened(pop3)
    recorder.logged_in(
        "alice@example.test", "USER", OrmMaildrop(pop3.executor, pop3.leases.lease(mailbox.pk), [])
    )
    asyncio.run(pop3.tick())
    session = row(recorder)
    mailbox.refresh_from_db()
    assert (mailbox.last_login_at, mailbox.last_login_from) == (session.authenticated_at, "192.0.2.7")

    recorder.closed(EndReason.QUIT, SessionStats())
    asyncio.run(pop3.tick())
    Pop3Session.objects.filter(pk=session.pk).update(started_at=LONG_AGO, ended_at=LONG_AGO)
    call_command("prunehistory", "--days", "1")
    mailbox.refresh_from_db()
    assert not Pop3Session.objects.exists()
    assert (mailbox.last_login_at, mailbox.last_login_from) == (session.authenticated_at, "192.0.2.7")


def failure_request(username: str) -> LoginRequest:
    return LoginRequest(username, "wrong", "USER", "192.0.2.7", True, "")


@pytest.mark.django_db
def test_a_failed_login_row_carries_the_domain_of_the_name_tried_in_its_one_insert():
    ours = Domain.objects.create(name="example.test")
    with CaptureQueriesContext(connection) as queries:
        for username in ("Alice@Example.TEST", "nobody@unknown.test", "no-domain"):
            record_failure(failure_request(username), "192.0.2.7", "bad credentials", {})
    assert [query["sql"].split()[0] for query in queries.captured_queries] == ["INSERT"] * 3
    assert list(AuthFailure.objects.order_by("pk").values_list("username", "domain_id")) == [
        ("Alice@Example.TEST", ours.pk),
        ("nobody@unknown.test", None),
        ("no-domain", None),
    ]


@pytest.mark.django_db(transaction=True)
def test_every_registry_write_moves_the_change_marker():
    pop3 = monitor()
    recorder = opened(pop3)
    asyncio.run(pop3.tick())
    inserted = row(recorder).updated_at
    assert inserted is not None
    assert list(Pop3Session.objects.changed_since(inserted - timedelta(seconds=1))) == [row(recorder)]

    Pop3Session.objects.update(updated_at=LONG_AGO)
    recorder.closed(EndReason.QUIT, SessionStats(commands=2))
    asyncio.run(pop3.tick())
    assert row(recorder).updated_at > LONG_AGO
    assert list(Pop3Session.objects.changed_since(LONG_AGO).values_list("end_reason", flat=True)) == ["quit"]


@pytest.mark.django_db(transaction=True)
def test_a_monitor_tick_holds_no_fsync_on_sqlite_and_writes_rows_durably_on_postgresql(commit_durability):
    """A tick's commits hold SQLite's write turn through no fsync; on PostgreSQL the rows wait
    for the disk (a server restart would forget them while runpop3 goes on), the heartbeat not."""
    pop3 = monitor()
    recorder = opened(pop3)
    recorder.closed(EndReason.QUIT, SessionStats(commands=3))
    registry.sync_node(pop3.node, pop3.outbox, {}, pop3.leases, [], interval=1.0, sweep=False)
    with transaction.atomic():
        Domain.objects.create(name="after.test")  # any other commit waits for the disk again
    assert (row(recorder).end_reason, row(recorder).commands) == ("quit", 3)
    assert Pop3Node.objects.filter(name=pop3.node).exists()
    if connection.vendor == "postgresql":
        assert commit_durability == ["off", "on", "on"]
    else:
        assert commit_durability == ["1", "1", "2"]


def session_row(*, started: datetime, ended: datetime | None = None, node: str = "testhost:1") -> Pop3Session:
    return Pop3Session.objects.create(
        id=uuid.uuid4(),
        node=node,
        peer_host="192.0.2.7",
        peer_port=40000,
        local_host="192.0.2.1",
        local_port=110,
        started_at=started,
        ended_at=ended,
        end_reason="quit" if ended else "",
    )


@pytest.mark.django_db
def test_the_sweep_of_lost_sessions_moves_the_change_marker():
    now = timezone.now()
    Pop3Node.objects.create(name="dead:1", started_at=now, heartbeat_at=now - timedelta(minutes=5))
    lost = session_row(started=now, node="dead:1")
    orphan = session_row(started=now, node="gone:1")
    Pop3Session.objects.update(updated_at=LONG_AGO)
    assert registry.sweep_lost_sessions(interval=1.0) == 2
    assert Pop3Session.objects.filter(updated_at=LONG_AGO).count() == 0
    assert {lost.pk, orphan.pk} == set(
        Pop3Session.objects.changed_since(LONG_AGO).values_list("pk", flat=True)
    )


@pytest.mark.django_db
def test_open_sessions_have_a_partial_index_of_their_own():
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, Pop3Session._meta.db_table)
        if connection.vendor == "postgresql":
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'pop3session_open'")
        else:
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'pop3session_open'")
        [definition] = cursor.fetchone()
    assert constraints["pop3session_open"]["columns"] == ["domain_id", "started_at"]
    assert definition.replace('"', "").replace("(", "").replace(")", "").endswith("WHERE ended_at IS NULL")


@pytest.mark.django_db
@pytest.mark.parametrize("model", [Pop3Session, AuthFailure])
def test_no_history_index_is_the_start_of_another(model):
    """Every index is pages to write for each row runpop3 adds and prunehistory deletes: one
    whose columns begin another (a foreign key's own, say) serves nothing the other does not."""
    partial = {index.name for index in model._meta.indexes if index.condition is not None}
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, model._meta.db_table)
    indexes = {
        name: tuple(details["columns"])
        for name, details in constraints.items()
        if (details["index"] or details["unique"]) and name not in partial
    }
    covered = {
        name: other
        for name, columns in indexes.items()
        for other, longer in indexes.items()
        if len(longer) > len(columns) and longer[: len(columns)] == columns
    }
    assert covered == {}
    time_field = "started_at" if model is Pop3Session else "created_at"
    by_value = {(name, time_field) for name in ["username", "domain_id", "peer_host"]}
    by_other_columns = {
        Pop3Session: {
            ("end_reason", "started_at"),
            ("mailbox_id", "ended_at"),
            ("node", "ended_at"),
            ("started_at",),
            ("updated_at",),
        },
        AuthFailure: {("created_at",), ("reason", "created_at"), ("source", "created_at")},
    }
    assert set(indexes.values()) - {("id",)} == by_value | by_other_columns[model]


def days_ago(days: int) -> datetime:
    return timezone.now() - timedelta(days=days)


def failure_row(created: datetime) -> AuthFailure:
    return AuthFailure.objects.create(
        created_at=created,
        peer_host="192.0.2.7",
        source="192.0.2.7",
        mechanism="USER",
        reason="bad credentials",
    )


@pytest.mark.django_db
def test_prunehistory_removes_what_ended_before_the_cutoff_and_never_an_open_session(capsys):
    session_row(started=days_ago(41), ended=days_ago(40))
    recent = session_row(started=days_ago(11), ended=days_ago(10))
    still_open = session_row(started=days_ago(100))
    failure_row(days_ago(40))
    recent_failure = failure_row(days_ago(10))

    call_command("prunehistory")
    assert capsys.readouterr().out == "removed 1 ended session and 1 failed login older than 30 days\n"
    assert set(Pop3Session.objects.values_list("pk", flat=True)) == {recent.pk, still_open.pk}
    assert list(AuthFailure.objects.values_list("pk", flat=True)) == [recent_failure.pk]

    call_command("prunehistory", "--days", "0")
    assert capsys.readouterr().out == "removed 1 ended session and 1 failed login older than 0 days\n"
    assert list(Pop3Session.objects.values_list("pk", flat=True)) == [still_open.pk]
    assert not AuthFailure.objects.exists()
    assert list(
        AuditEntry.objects.order_by("pk").values_list("actor_kind", "action", "object_name", "changes")
    ) == [
        (
            "cli",
            "prune history",
            "older than 30 days",
            {"ended sessions": [1, 0], "failed logins": [1, 0], "hourly figures": [0, 0]},
        ),
        (
            "cli",
            "prune history",
            "older than 0 days",
            {"ended sessions": [1, 0], "failed logins": [1, 0], "hourly figures": [0, 0]},
        ),
    ]


@pytest.mark.django_db
def test_a_domain_administrator_may_not_prune_every_domains_history():
    domain = Domain.objects.create(name="ours.test")
    olivia = Actor(ActorKind.USER, "olivia", domain_ids=frozenset({domain.pk}))
    session_row(started=days_ago(41), ended=days_ago(40))
    with pytest.raises(services.NotPermitted):
        services.prune_history(olivia, 0)
    assert Pop3Session.objects.count() == 1
    assert not AuditEntry.objects.exists()


@pytest.mark.django_db
def test_prunehistory_defaults_to_the_history_setting(settings, capsys):
    settings.MAILADMIN_HISTORY_DAYS = 50
    session_row(started=days_ago(41), ended=days_ago(40))
    failure_row(days_ago(60))
    call_command("prunehistory")
    assert capsys.readouterr().out == "removed 0 ended sessions and 1 failed login older than 50 days\n"
    assert Pop3Session.objects.count() == 1


@pytest.mark.django_db
def test_prunehistory_refuses_a_negative_number_of_days():
    with pytest.raises(CommandError, match="invalid number '-1'"):
        call_command("prunehistory", "--days", "-1")


@pytest.mark.django_db
def test_pruning_deletes_in_transactions_of_one_batch_each():
    for _ in range(5):
        session_row(started=days_ago(41), ended=days_ago(40))
        failure_row(days_ago(40))
    with CaptureQueriesContext(connection) as queries:
        assert prune_history(30, batch_size=2) == Pruned(sessions=5, failures=5)
    deletes = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("DELETE")]
    assert [sql.split()[2].strip('"') for sql in deletes] == [
        "mailadmin_hourlyfigures",
        "mailadmin_deliveryfigures",
        *["mailadmin_pop3session"] * 3,
        *["mailadmin_authfailure"] * 3,
    ]
    assert not Pop3Session.objects.exists() and not AuthFailure.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_each_batch_runs_with_the_garbage_collector_off_and_leaves_no_flush_to_the_writers(
    monkeypatch,
):
    """runpop3's writers wait out a batch: no full collection inside it; on SQLite no fsync in
    the write turn, on PostgreSQL no WAL backlog left for their commits to flush."""
    for _ in range(3):
        session_row(started=days_ago(41), ended=days_ago(40))
    seen = []

    def roll_up(rows):
        with connection.cursor() as cursor:
            if connection.vendor == "sqlite":
                cursor.execute("PRAGMA synchronous")
            else:
                cursor.execute("SHOW synchronous_commit")
            seen.append((len(rows), gc.isenabled(), cursor.fetchone()[0]))

    monkeypatch.setattr(figures, "roll_up_sessions", roll_up)
    assert gc.isenabled()
    assert prune_history(30, batch_size=2) == Pruned(sessions=3, failures=0)
    no_flush_to_others = 1 if connection.vendor == "sqlite" else "on"  # 1: NORMAL, no fsync in WAL mode
    assert seen == [(2, False, no_flush_to_others), (1, False, no_flush_to_others)]
    assert gc.isenabled()
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA synchronous")
            assert cursor.fetchone()[0] == 2  # FULL again for every other commit


@pytest.mark.django_db(transaction=True)
def test_on_sqlite_each_batch_waits_for_the_log_to_be_copied_before_the_next(monkeypatch):
    for _ in range(3):
        session_row(started=days_ago(41), ended=days_ago(40))
    events = []
    monkeypatch.setattr(figures, "roll_up_sessions", lambda rows: events.append(f"batch of {len(rows)}"))
    if connection.vendor == "sqlite":
        monkeypatch.setattr(connection, "checkpoint_now", lambda: events.append("log copied"))
    assert prune_history(30, batch_size=2) == Pruned(sessions=3, failures=0)
    if connection.vendor == "sqlite":
        assert events == ["batch of 2", "log copied", "batch of 1", "log copied"]
    else:
        assert events == ["batch of 2", "batch of 1"]


@contextlib.contextmanager
def counting_rows_visited() -> Iterator[list[int]]:
    """Work the database does while the block runs, as a count: SQLite's virtual machine
    steps (in hundreds), PostgreSQL's pop3session tuples fetched through an index (index
    scans forced, so a small table's plan does not hide the work a large one's would do)."""
    seen = [0]
    if connection.vendor == "sqlite":

        def step() -> int:
            seen[0] += 1
            return 0

        connection.connection.set_progress_handler(step, 100)
        try:
            yield seen
        finally:
            connection.connection.set_progress_handler(None, 100)
        return
    fetched = (
        "SELECT idx_tup_fetch + coalesce(seq_tup_read, 0) FROM pg_stat_xact_user_tables "
        "WHERE relname = 'mailadmin_pop3session'"
    )
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(fetched)
        before = cursor.fetchone()[0]
        yield seen
        cursor.execute(fetched)
        seen[0] = cursor.fetchone()[0] - before


def pruning_work(open_rows: int) -> int:
    """The work of pruning 300 ended sessions, after ``open_rows`` older sessions still open."""
    for _ in range(open_rows):
        session_row(started=days_ago(50))
    for _ in range(300):
        session_row(started=days_ago(41), ended=days_ago(40))
    with counting_rows_visited() as seen:
        assert prune_history(30, batch_size=10) == Pruned(sessions=300, failures=0)
    assert Pop3Session.objects.count() == open_rows
    Pop3Session.objects.all().delete()
    return seen[0]


@pytest.mark.django_db
def test_each_batch_goes_on_from_where_the_last_one_stopped_not_past_the_open_sessions_again():
    """Open sessions older than the cutoff stay; a batch that began at the oldest row would
    step over all of them again, 30 times here, and, on PostgreSQL, over the index entries of
    every row deleted before a vacuum. Found in a whole bench run: the last batches of a prune
    held the write turn up to 900 ms."""
    alone = pruning_work(open_rows=0)
    behind_open_ones = pruning_work(open_rows=300)
    assert alone > 0
    assert behind_open_ones < 2 * alone, (alone, behind_open_ones)


@pytest.mark.django_db
def test_a_batch_that_ends_among_rows_of_the_same_time_leaves_none_of_them():
    same_start, same_end = days_ago(41), days_ago(40)
    for _ in range(25):
        session_row(started=same_start, ended=same_end)
        failure_row(same_end)
    assert prune_history(30, batch_size=10) == Pruned(sessions=25, failures=25)
    assert not Pop3Session.objects.exists() and not AuthFailure.objects.exists()


@pytest.mark.django_db
def test_a_session_that_comes_due_behind_the_batches_is_pruned_in_the_same_run(monkeypatch):
    """A lost session swept closed while the prune runs ends at its start: the batches have
    gone past it, a last look from the oldest row finds it."""
    lost = session_row(started=days_ago(50))
    for _ in range(5):
        session_row(started=days_ago(41), ended=days_ago(40))
    roll_up = figures.roll_up_sessions

    def swept_during_the_first_batch(rows):
        roll_up(rows)
        Pop3Session.objects.filter(pk=lost.pk).update(ended_at=lost.started_at, end_reason="lost")

    monkeypatch.setattr(figures, "roll_up_sessions", swept_during_the_first_batch)
    assert prune_history(30, batch_size=2) == Pruned(sessions=6, failures=0)
    assert not Pop3Session.objects.exists()


@pytest.mark.django_db
def test_a_kick_moves_the_change_marker():
    now = timezone.now()
    open_session = session_row(started=now)
    Pop3Session.objects.update(updated_at=LONG_AGO)
    assert services.kick_sessions(Actor.cli(), session_ids=[open_session.pk]) == 1
    assert list(Pop3Session.objects.changed_since(LONG_AGO).values_list("pk", flat=True)) == [open_session.pk]


@pytest.mark.django_db(transaction=True)
def test_rows_queued_again_after_a_failed_tick_are_written_once_without_an_error(caplog):
    pop3 = monitor()
    recorder = opened(pop3)
    outbox = pop3.outbox
    registry.write_session_rows(outbox)
    with caplog.at_level("ERROR", logger="mailadmin.pop3"):
        registry.write_session_rows(outbox)  # the same inserts again, as a requeue sends them
    assert Pop3Session.objects.filter(pk=recorder.session_id).count() == 1
    assert [record.getMessage() for record in caplog.records] == []
