"""runpop3's monitor writes its session rows in plain SQL built once (``fastsql``), not through
the ORM: the same rows, a tenth of the CPU, and prepared on PostgreSQL."""

import asyncio
import uuid

import pytest
from django.db import connection

from mailadmin.hosting import store
from mailadmin.models import Mailbox, Pop3Session
from mailadmin.pop3d import registry
from mailadmin.pop3d.maildrop import OrmMaildrop
from pop3.mailbox import ConnectionInfo, EndReason, SessionStats
from tests.test_session_history import FakeSession, monitor


def short_session(pop3: registry.Pop3Monitor, mailbox: Mailbox, port: int) -> registry.SessionRecorder:
    """Opened, logged in, a few commands and ended, all before the monitor's next tick."""
    recorder = pop3.recorder(FakeSession())
    recorder.opened(ConnectionInfo(("192.0.2.7", port), ("192.0.2.1", 110), False, uuid.uuid4().hex))
    recorder.tls_established("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    recorder.logged_in(
        mailbox.user.username, "USER", OrmMaildrop(pop3.executor, pop3.leases.lease(mailbox.pk), [])
    )
    recorder.closed(
        EndReason.QUIT, SessionStats(commands=7, bytes_in=90, bytes_out=2048, retr_count=2, retr_bytes=1900)
    )
    return recorder


@pytest.mark.django_db(transaction=True)
def test_a_short_sessions_row_is_written_whole_in_one_tick(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    pop3 = monitor()
    recorder = short_session(pop3, mailbox, 40001)

    asyncio.run(pop3.tick())

    expected = {
        "node": "testhost:1",
        "username": "alice@example.test",
        "mailbox_id": mailbox.pk,
        "domain_id": mailbox.domain_id,
        "peer_host": "192.0.2.7",
        "peer_port": 40001,
        "local_host": "192.0.2.1",
        "local_port": 110,
        "implicit_tls": False,
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_128_GCM_SHA256",
        "end_reason": "quit",
        "kick_requested_at": None,
        "commands": 7,
        "bytes_in": 90,
        "bytes_out": 2048,
        "retr_count": 2,
        "retr_bytes": 1900,
        "top_count": 0,
        "deleted_count": 0,
        "message_count": 0,
    }
    times = ("started_at", "authenticated_at", "ended_at", "updated_at")
    row = Pop3Session.objects.values(*expected, *times).get(pk=recorder.session_id)
    assert {name: row[name] for name in expected} == expected
    assert row["started_at"] <= row["authenticated_at"] <= row["ended_at"]
    assert row["updated_at"] is not None
    mailbox.refresh_from_db()
    assert (mailbox.last_login_at, mailbox.last_login_from) == (row["authenticated_at"], "192.0.2.7")


@pytest.mark.django_db(transaction=True)
def test_a_mailbox_deleted_before_the_tick_leaves_the_row_pointing_nowhere(make_mailbox):
    mailbox = make_mailbox("alice@example.test")
    pop3 = monitor()
    recorder = short_session(pop3, mailbox, 40002)
    store.delete_mailbox(mailbox.user.username)

    asyncio.run(pop3.tick())

    row = Pop3Session.objects.get(pk=recorder.session_id)
    assert (row.username, row.mailbox_id, row.domain_id, row.end_reason) == (
        "alice@example.test",
        None,
        None,
        "quit",
    )


@pytest.mark.django_db(transaction=True)
def test_a_session_rows_statements_are_prepared_on_postgresql(make_mailbox):
    """Through the ORM, every tick compiled each UPDATE again (over a millisecond of CPU per
    session) and PostgreSQL planned it again; now each is built once and prepared."""
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's")
    if connection.connection is None:
        connection.ensure_connection()
    threshold = connection.connection.prepare_threshold
    if threshold is None:
        pytest.skip("DATABASE_PREPARE_THRESHOLD is off here")
    mailbox = make_mailbox("alice@example.test")
    pop3 = monitor()

    def tick_on_this_connection() -> None:
        outbox, pop3.outbox = pop3.outbox, registry.Outbox()
        registry.write_session_rows(outbox)

    for port in range(threshold + 1):
        short_session(pop3, mailbox, 41000 + port)
        tick_on_this_connection()

    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement.split(" SET ")[0] for (statement,) in cursor.fetchall()]
    table = Pop3Session._meta.db_table
    assert f"UPDATE {connection.ops.quote_name(table)}" in prepared
    assert f"UPDATE {Mailbox._meta.db_table}" in prepared  # the mailbox's last login
    assert any(statement.startswith(f'INSERT INTO "{table}"') for statement in prepared)
    assert Pop3Session.objects.filter(ended_at__isnull=False).count() == threshold + 1
