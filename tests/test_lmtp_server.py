"""The asyncio LMTP server in-process over loopback, with the store replaced by a stand-in.

What the transcripts cannot show: how the server turns look-ups, spool limits and commit
outcomes into replies. Every path after DATA still answers once per accepted recipient.
"""

import asyncio
import dataclasses
import socket
from collections.abc import Callable

import pytest
from django.db import DatabaseError, InterfaceError, connection

from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    RecipientResult,
    deliver_group,
    look_up_recipient,
)
from mailadmin.mailin.lmtp.protocol import Policy
from mailadmin.mailin.lmtp.server import LmtpConfig, LmtpServer
from mailadmin.management.commands.runlmtp import lmtp_config
from tests.lmtp_replies import (
    DATABASE_DOWN,
    FULL_PERMANENT,
    FULL_TEMPORARY,
    GREETING,
    HOSTNAME,
    IDLE_TOO_LONG,
    MAILBOX_DISABLED,
    RECIPIENT_OK,
    SAVED,
    SENDER_OK,
    START_DATA,
    TEMPORARY_FAILURE,
    TOO_BIG,
    lhlo_reply,
    wire,
)

MAX_MESSAGE_BYTES = 10_000
RECIPIENTS = ("one@example.test", "two@example.test", "three@example.test")


def config(*, over_quota_permanent: bool = False) -> LmtpConfig:
    return LmtpConfig(
        policy=Policy(
            hostname=HOSTNAME,
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_recipients=10,
            max_data_line_bytes=2000,
        ),
        over_quota_permanent=over_quota_permanent,
        idle_timeout=30.0,
        max_group=64,
        group_writers=1,
        db_threads=2,
    )


class StandInStore:
    """Takes the executor's place: RCPT finds every address, a commit gives ``outcome``'s results."""

    def __init__(self, outcome: Callable[[list[Delivery]], list[list[RecipientResult]]]) -> None:
        self.outcome = outcome
        self.messages: list[bytes] = []

    async def run(self, function, *args):
        if function is look_up_recipient:
            return Recipient(args[0], mailboxes=())
        assert function is deliver_group
        deliveries, _tally = args
        self.messages += [b"".join(d.message.chunks(4096)) for d in deliveries]
        return self.outcome(deliveries)


def all_with(*statuses: DeliveryStatus) -> Callable[[list[Delivery]], list[list[RecipientResult]]]:
    def outcome(deliveries: list[Delivery]) -> list[list[RecipientResult]]:
        return [
            [RecipientResult(r.address, status) for r, status in zip(d.recipients, statuses, strict=True)]
            for d in deliveries
        ]

    return outcome


def raising(error: Exception) -> Callable[[list[Delivery]], list[list[RecipientResult]]]:
    def outcome(deliveries: list[Delivery]) -> list[list[RecipientResult]]:
        raise error

    return outcome


def converse(
    executor, client: bytes, *, lmtp_config: LmtpConfig | None = None, half_close: bool = False
) -> bytes:
    """Send ``client`` (ending with QUIT, or ``half_close``) to an in-process server; return its replies."""

    async def scenario() -> bytes:
        server = LmtpServer(lmtp_config or config(), executor)
        listener = socket.create_server(("127.0.0.1", 0))
        await server.listen(listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        writer.write(client)
        if half_close:
            writer.write_eof()
        received = await reader.read()
        writer.close()
        await server.shutdown(grace=1.0)
        return received

    return asyncio.run(scenario())


def session(message: bytes, recipients: tuple[str, ...] = RECIPIENTS) -> bytes:
    return (
        wire("LHLO client.test", "MAIL FROM:<s@remote.test>", *[f"RCPT TO:<{r}>" for r in recipients], "DATA")
        + message
        + wire("QUIT")
    )


def replies(after_data: list[str], recipients: tuple[str, ...] = RECIPIENTS) -> bytes:
    return wire(
        GREETING,
        *lhlo_reply(MAX_MESSAGE_BYTES),
        SENDER_OK,
        *[RECIPIENT_OK] * len(recipients),
        START_DATA,
        *after_data,
        "221 2.0.0 Bye",
    )


@pytest.mark.parametrize(
    "error", [RuntimeError("a bug in the group"), DatabaseError("connection lost")], ids=["bug", "database"]
)
def test_a_commit_that_fails_gets_a_451_per_recipient_never_one_line_for_all(error):
    store = StandInStore(raising(error))
    received = converse(store, session(b"Subject: x\r\n\r\nbody\r\n.\r\n"))
    assert received == replies([TEMPORARY_FAILURE.format(rcpt=r) for r in RECIPIENTS])


@pytest.mark.parametrize(("permanent", "full"), [(False, FULL_TEMPORARY), (True, FULL_PERMANENT)])
def test_each_recipient_gets_the_reply_of_its_own_result(permanent, full):
    store = StandInStore(
        all_with(DeliveryStatus.DELIVERED, DeliveryStatus.OVER_QUOTA, DeliveryStatus.MAILBOX_INACTIVE)
    )
    received = converse(
        store, session(b"Subject: x\r\n\r\nbody\r\n.\r\n"), lmtp_config=config(over_quota_permanent=permanent)
    )
    assert received == replies(
        [
            SAVED.format(rcpt="one@example.test"),
            full.format(rcpt="two@example.test"),
            MAILBOX_DISABLED.format(rcpt="three@example.test"),
        ]
    )


def message_of_size(size: int) -> bytes:
    """A CRLF message of exactly ``size`` bytes (no line starts with a dot)."""
    head = b"Subject: sized\r\n\r\n"
    line = b"y" * 78 + b"\r\n"
    full_lines, rest = divmod(size - len(head), len(line))
    message = head + line * full_lines + (b"z" * (rest - 2) + b"\r\n" if rest else b"")
    assert len(message) == size
    return message


def test_a_message_over_the_size_limit_gets_552_per_recipient_and_one_at_the_limit_is_stored():
    store = StandInStore(all_with(*[DeliveryStatus.DELIVERED] * 3))
    assert converse(store, session(message_of_size(MAX_MESSAGE_BYTES + 1) + b".\r\n")) == replies(
        [TOO_BIG] * 3
    )
    assert store.messages == []
    exact = message_of_size(MAX_MESSAGE_BYTES)
    received = converse(store, session(exact + b".\r\n"))
    assert received == replies([SAVED.format(rcpt=r) for r in RECIPIENTS])
    assert store.messages == [exact]


@pytest.mark.parametrize(
    "error", [DatabaseError("could not connect"), InterfaceError("connection already closed")], ids=type
)
def test_rcpt_gets_451_while_the_database_is_unavailable(error):
    class DatabaseDown(StandInStore):
        async def run(self, function, *args):
            raise error

    received = converse(
        DatabaseDown(all_with()),
        wire("LHLO client.test", "MAIL FROM:<>", "RCPT TO:<one@example.test>", "QUIT"),
    )
    assert received == wire(
        GREETING, *lhlo_reply(MAX_MESSAGE_BYTES), SENDER_OK, DATABASE_DOWN, "221 2.0.0 Bye"
    )


def test_a_logged_recipient_cannot_forge_a_field_of_the_log_line(caplog):
    class DatabaseDown(StandInStore):
        async def run(self, function, *args):
            raise DatabaseError("could not connect")

    with caplog.at_level("WARNING", logger="mailadmin.mailin.lmtp.server"):
        converse(
            DatabaseDown(all_with()),
            wire("LHLO client.test", "MAIL FROM:<>", "RCPT TO:<x rip=203.0.113.66@example.test>", "QUIT"),
        )
    assert [record.getMessage() for record in caplog.records] == [
        "RCPT x\\x20rip\\x3d203.0.113.66@example.test: database unavailable"
    ]


def test_a_client_stalling_mid_data_is_disconnected_with_421_and_nothing_is_committed():
    store = StandInStore(all_with(DeliveryStatus.DELIVERED))

    async def scenario() -> bytes:
        server = LmtpServer(dataclasses.replace(config(), idle_timeout=0.05), store)
        listener = socket.create_server(("127.0.0.1", 0))
        await server.listen(listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        writer.write(session(b"Subject: cut short\r\n\r\nhalf")[: -len(wire("QUIT"))])
        received = await reader.read()
        writer.close()
        await server.shutdown(grace=1.0)
        return received

    received = asyncio.run(scenario())
    assert received.endswith(wire(START_DATA, IDLE_TOO_LONG))
    assert store.messages == []


def test_a_client_closing_its_side_mid_data_gets_no_reply_and_nothing_is_committed():
    store = StandInStore(all_with(DeliveryStatus.DELIVERED))
    client = session(b"Subject: cut short\r\n\r\n" + b"0123456789" * 5000 + b"\r\n")[
        : -len(wire(".", "QUIT"))
    ]
    assert converse(store, client, half_close=True).endswith(wire(START_DATA))  # no word after the 354
    assert store.messages == []


def test_runlmtp_builds_the_listener_configuration_from_settings(settings):
    settings.LMTP_HOSTNAME = "mx.example.test"
    settings.MAILADMIN_MAX_MESSAGE_SIZE_BYTES = 12345
    settings.LMTP_MAX_RECIPIENTS = 7
    settings.LMTP_MAX_LINE_BYTES = 999
    settings.LMTP_OVER_QUOTA_PERMANENT = True
    settings.LMTP_IDLE_TIMEOUT = 42.0
    settings.LMTP_GROUP_COMMIT_MAX = 5
    settings.LMTP_GROUP_WRITERS = 3
    writers = 1 if connection.vendor == "sqlite" else 3
    expected = LmtpConfig(
        policy=Policy(
            hostname="mx.example.test", max_message_bytes=12345, max_recipients=7, max_data_line_bytes=999
        ),
        over_quota_permanent=True,
        idle_timeout=42.0,
        max_group=5,
        group_writers=writers,
        db_threads=2 if connection.vendor == "sqlite" else 5,  # by database: the writers and look-ups'
    )
    assert lmtp_config() == expected
    settings.LMTP_DB_THREADS = 7
    assert lmtp_config() == dataclasses.replace(expected, db_threads=7)
