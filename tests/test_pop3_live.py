"""Session records and resilience of the ORM side of runpop3."""

import asyncio
import logging

import pytest
from django.db import connection

from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import store
from mailadmin.mailin.delivery import deliver
from mailadmin.models import Pop3Session
from mailadmin.pop3d.maildrop import OrmMaildrop, snapshot
from mailadmin.pop3d.registry import Pop3Monitor, printable
from pop3.mailbox import ConnectionInfo, EndReason, LoginFailure, SessionStats


def test_printable_escapes_control_and_format_characters():
    assert printable("evil\r\nFAKE LOG LINE\x00\u202e") == "evil??FAKE LOG LINE??"
    assert printable("plain@example.test") == "plain@example.test"


class FakeSession:
    def __init__(self) -> None:
        self.kicked: list[EndReason] = []

    def kick(self, reason: EndReason) -> bool:
        self.kicked.append(reason)
        return True


@pytest.mark.django_db(transaction=True)
def test_a_session_row_follows_the_session_and_one_escaped_line_is_logged(caplog):
    monitor = Pop3Monitor(BoundedExecutor(1, "test-db"), node="testhost:1", interval=1.0, lease_ttl=60)
    recorder = monitor.recorder(FakeSession())
    info = ConnectionInfo(("192.0.2.7", 40000), ("192.0.2.1", 110), False, "0123456789abcdef0123456789abcdef")
    recorder.opened(info)
    recorder.login_failed("mallory\r\nuser=<root>", LoginFailure.BAD_CREDENTIALS, "USER")
    stats = SessionStats(commands=4, bytes_in=60, bytes_out=120)
    with caplog.at_level(logging.INFO, logger="mailadmin.pop3"):
        recorder.closed(EndReason.DROPPED, stats)
    asyncio.run(monitor.tick())
    row = Pop3Session.objects.get()
    assert (row.node, row.peer_host, row.local_port, row.username) == (
        "testhost:1",
        "192.0.2.7",
        110,
        "mallory??user=<root>",
    )
    assert (row.end_reason, row.commands, row.bytes_in, row.bytes_out) == ("dropped", 4, 60, 120)
    assert row.ended_at is not None
    assert caplog.messages == [
        "session=<0123456789abcdef0123456789abcdef> user=<mallory??user=<root>> rip=192.0.2.7 lip=192.0.2.1: "
        "dropped top=0/0, retr=0/0, del=0/0, size=0, in=60, out=120"
    ]


@pytest.mark.django_db(transaction=True)
def test_maildrop_reads_survive_the_database_dropping_its_connections(make_mailbox):
    if connection.vendor != "postgresql":
        pytest.skip("terminating server-side connections needs PostgreSQL")
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: a\r\n\r\nsurvives\r\n"])
    executor = BoundedExecutor(1, "test-db")
    assert store.acquire_lease(mailbox.pk, "owner", "test", 60)
    maildrop = OrmMaildrop(executor, mailbox.pk, "owner", snapshot(mailbox.pk))

    async def read() -> bytes:
        return b"".join([chunk async for chunk in maildrop.read(maildrop.messages[0])])

    first = asyncio.run(read())
    with connection.cursor() as cursor:  # what a PostgreSQL restart does to every open connection
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    assert asyncio.run(read()) == first
    assert first.endswith(b"survives\r\n")
