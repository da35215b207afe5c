"""What a message's row keeps of its headers and envelope, on every way in.

Subject, From and the envelope sender are shown in listings and must fit their columns: a NUL
(which PostgreSQL refuses in text), another control character, an undecodable byte or an
over-long value is cleaned and cut when the row is written, so the delivery succeeds instead of
failing the same way on every retry. The stored bytes stay exactly as received.
"""

import io
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection

from mailadmin.hosting import store
from mailadmin.mailin import messagefile
from mailadmin.mailin.delivery import Delivery, DeliveryStatus, deliver, deliver_group, look_up_recipient
from mailadmin.models import Message
from tests.conftest import run_manage
from tests.lmtp_replies import RECIPIENT_OK, SAVED, SENDER_OK, START_DATA
from tests.lmtp_server import LmtpProcess, lmtp_server_fixture  # noqa: F401 (the lmtp_server fixture)

ADDRESS = "alice@example.test"
SENDER = "sender@remote.test"
LONG_SENDER = "s" * 380 + "@remote.test"  # 392 characters; the column holds 320
LONG_SUBJECT = "é" * 300  # the column holds 255 characters

BODY = b"\r\nbody \x00 kept\r\n"
# (header block, the Subject and From stored for listings)
HEADERS = [
    (b"Subject: a\x00b\r\nFrom: x\x00y <x@remote.test>\r\n", "ab", "xy <x@remote.test>"),
    (
        b"Subject: =?utf-8?q?a=00b=1B[1m?=\r\nFrom: =?utf-8?q?x=00y?= <x@remote.test>\r\n",
        "ab[1m",
        "xy <x@remote.test>",
    ),
    ("Subject: {}\r\nFrom: {}\r\n".format(LONG_SUBJECT, "f" * 400).encode(), "é" * 255, "f" * 255),
]
HEADER_IDS = ["nul", "nul-in-encoded-words", "over-long"]
# (envelope sender as given, as stored, as written in Return-Path)
SENDERS = [
    ("s\x00x@remote.test", "sx@remote.test", "sx@remote.test"),
    (LONG_SENDER, LONG_SENDER[:320], LONG_SENDER),
    ("s\udcffx@remote.test", "s\ufffdx@remote.test", "sx@remote.test"),  # a byte that is not UTF-8
]
SENDER_IDS = ["nul", "over-long", "undecodable"]


def trace(return_path: str, recipient: str = ADDRESS) -> bytes:
    return f"Return-Path: <{return_path}>\r\nDelivered-To: {recipient}\r\n".encode()


def stored_row() -> tuple[str, str, str, bytes]:
    """(subject, from_header, envelope_sender, bytes) of the one message stored."""
    message = Message.objects.get()
    content = b"".join(store.iter_message_bytes(message.pk))
    return message.subject, message.from_header, message.envelope_sender, content


# --- deliver() ------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("headers", "subject", "from_header"), HEADERS, ids=HEADER_IDS)
def test_deliver_stores_subject_and_from_cleaned_and_cut_and_the_bytes_as_received(
    make_mailbox, headers, subject, from_header
):
    make_mailbox(ADDRESS)
    [result] = deliver([ADDRESS], [headers + BODY], sender=SENDER)
    assert result.status is DeliveryStatus.DELIVERED
    assert stored_row() == (subject, from_header, SENDER, trace(SENDER) + headers + BODY)


@pytest.mark.django_db
@pytest.mark.parametrize(("sender", "stored_sender", "return_path"), SENDERS, ids=SENDER_IDS)
def test_deliver_stores_the_envelope_sender_cleaned_and_cut(make_mailbox, sender, stored_sender, return_path):
    make_mailbox(ADDRESS)
    message = b"Subject: plain\r\n" + BODY
    [result] = deliver([ADDRESS], [message], sender=sender)
    assert result.status is DeliveryStatus.DELIVERED
    assert stored_row() == ("plain", "", stored_sender, trace(return_path) + message)


# --- LMTP -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lmtp_saves_a_message_with_a_nul_subject_from_a_392_character_sender(
    lmtp_server: LmtpProcess, make_mailbox
):
    make_mailbox(ADDRESS)
    headers, subject, from_header = HEADERS[0]
    with lmtp_server.connect() as client:
        client.send(b"LHLO client.test\r\n")
        client.reply()
        assert client.command(f"MAIL FROM:<{LONG_SENDER}>") == SENDER_OK
        assert client.command(f"RCPT TO:<{ADDRESS}>") == RECIPIENT_OK
        assert client.command("DATA") == START_DATA
        client.send(headers + BODY + b".\r\n")
        assert client.line() == SAVED.format(rcpt=ADDRESS)
    assert stored_row() == (subject, from_header, LONG_SENDER[:320], trace(LONG_SENDER) + headers + BODY)


# --- manage.py deliver ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("sender", "stored_sender", "return_path"), SENDERS[1:], ids=SENDER_IDS[1:])
def test_deliver_command_exits_0_for_a_nul_subject_and_an_odd_sender(
    make_mailbox, sender, stored_sender, return_path
):
    make_mailbox(ADDRESS)
    headers, subject, from_header = HEADERS[0]
    result = run_manage("deliver", "--sender", sender, ADDRESS, input=headers + BODY)
    assert result.returncode == 0, result.stderr
    assert stored_row() == (subject, from_header, stored_sender, trace(return_path) + headers + BODY)


# --- importmail --mbox ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("sender", "stored_sender", "_"), SENDERS[:2], ids=SENDER_IDS[:2])
def test_importmail_mbox_stores_a_nul_subject_from_an_odd_sender(
    make_mailbox, tmp_path: Path, sender, stored_sender, _
):
    make_mailbox(ADDRESS)
    headers, subject, from_header = HEADERS[1]
    date = time.asctime(datetime(2023, 1, 2, 3, 4, 5, tzinfo=UTC).utctimetuple())
    (tmp_path / "in.mbox").write_bytes(f"From {sender} {date}\n".encode() + headers + BODY + b"\n")
    out = io.StringIO()
    call_command("importmail", ADDRESS, "--mbox", str(tmp_path / "in.mbox"), stdout=out)
    assert out.getvalue() == f"{ADDRESS}: 1 imported, 0 already present\n"
    assert stored_row() == (subject, from_header, stored_sender, headers + BODY)


@pytest.mark.django_db(transaction=True)
def test_subject_and_from_are_parsed_before_the_delivery_transaction_begins(make_mailbox, monkeypatch):
    """On SQLite every writer of every process waits while a transaction is open: the header
    parsing is done before it, not inside it."""
    make_mailbox(ADDRESS)
    parsed_in_a_transaction = []
    summarise = messagefile.summarise_headers

    def noting_the_transaction(header_block: bytes) -> messagefile.HeaderSummary:
        parsed_in_a_transaction.append(connection.in_atomic_block)
        return summarise(header_block)

    monkeypatch.setattr(messagefile, "summarise_headers", noting_the_transaction)
    found = look_up_recipient(ADDRESS)
    with messagefile.spool_message([b"Subject: hello\r\nFrom: x@remote.test\r\n\r\nbody\r\n"]) as message:
        (results,) = deliver_group([Delivery([found], message, SENDER)])

    assert [result.status for result in results] == [DeliveryStatus.DELIVERED]
    assert parsed_in_a_transaction == [False]
    assert list(Message.objects.values_list("subject", "from_header")) == [("hello", "x@remote.test")]


@pytest.mark.django_db(transaction=True)
def test_a_header_python_cannot_decode_fails_no_delivery_of_its_group(make_mailbox):
    """``=?idna?q?...?=`` makes Python's idna codec raise instead of replacing: parsed before the
    transaction, it failed every delivery of the group with a temporary failure."""
    make_mailbox(ADDRESS)
    found = look_up_recipient(ADDRESS)
    undecodable = b"Subject: =?idna?q?abc?=\r\nFrom: x@remote.test\r\n\r\nbody\r\n"
    with (
        messagefile.spool_message([undecodable]) as first,
        messagefile.spool_message([b"Subject: fine\r\n\r\nbody\r\n"]) as second,
    ):
        results = deliver_group([Delivery([found], first, SENDER), Delivery([found], second, SENDER)])

    assert [[result.status for result in group] for group in results] == [[DeliveryStatus.DELIVERED]] * 2
    assert list(Message.objects.order_by("pk").values_list("subject", flat=True)) == ["abc", "fine"]
