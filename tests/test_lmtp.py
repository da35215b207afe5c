"""runlmtp (RFC 2033) over real sockets: raw LMTP and ``smtplib.LMTP`` against server processes.

Every test starts its own ``manage.py runlmtp`` on the test database (``tests.lmtp_server``)
and checks the exact replies and what reached the store: the stored bytes, the messages per
mailbox, and the quota counters of the mailbox and its domain. What needs neither a process
nor a database is in the transcripts (``test_lmtp_protocol``) and the in-process server tests
(``test_lmtp_server``).
"""

import asyncio
import ctypes
import hashlib
import os
import signal
import smtplib
import socket
import stat
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connection

from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store import iter_message_bytes, loopsql
from mailadmin.mailin.delivery import deliver
from mailadmin.models import Mailbox, Message
from tests.conftest import run_manage
from tests.lmtp_replies import (
    BYE,
    DATABASE_DOWN,
    FULL_TEMPORARY,
    MAILBOX_DISABLED,
    NO_VALID_RECIPIENTS,
    OK,
    RECIPIENT_OK,
    SAVED,
    SENDER_OK,
    SHUTTING_DOWN,
    START_DATA,
    TEMPORARY_FAILURE,
    USER_UNKNOWN,
    lhlo_reply,
)
from tests.lmtp_server import (
    HOST,
    LmtpProcess,
    RawLmtp,
    lmtp_server_fixture,  # noqa: F401 (the lmtp_server fixture)
    running_lmtp,
)
from tests.pop3_server import mebibytes, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SENDER = "sender@remote.test"
PORT_25_REFUSED = "LMTP must never listen on port 25 (RFC 2033 section 5)"
WARNING_SUBJECT = "Your mailbox is {percent}% full"

# A message as sent on the wire (dot-stuffed, one bare-LF line), and the bytes the store must
# keep after the trace lines: CRLF everywhere, one leading dot taken off each stuffed line.
WIRE_MESSAGE = (
    b"Subject: mixed\r\nFrom: <sender@remote.test>\r\n\r\n"
    b"first line\r\n..leading dot\r\nbare line feed\n...\r\nlast\r\n.\r\n"
)
STORED_MESSAGE = (
    b"Subject: mixed\r\nFrom: <sender@remote.test>\r\n\r\n"
    b"first line\r\n.leading dot\r\nbare line feed\r\n..\r\nlast\r\n"
)
SMALL_MESSAGE = b"Subject: small\r\n\r\nsmall body\r\n"


def trace(sender: str, recipient: str) -> bytes:
    """The Return-Path and Delivered-To lines every stored copy starts with."""
    return f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()


def stored_messages(address: str) -> list[bytes]:
    mailbox = Mailbox.objects.get(user__username=address)
    return [
        b"".join(iter_message_bytes(pk))
        for pk in Message.objects.for_maildrop(mailbox).values_list("pk", flat=True)
    ]


def counters(address: str) -> tuple[int, int, int]:
    mailbox = Mailbox.objects.select_related("domain").get(user__username=address)
    return mailbox.used_bytes, mailbox.used_messages, mailbox.domain.used_bytes


def begin(
    client: RawLmtp, recipients: list[str], *, sender: str = SENDER, mail_parameters: str = ""
) -> list[str]:
    """LHLO, MAIL and one RCPT per recipient; return the RCPT replies."""
    client.send(b"LHLO client.test\r\n")
    assert client.reply()[-1].startswith("250 SIZE ")
    assert client.command(f"MAIL FROM:<{sender}>{mail_parameters}") == SENDER_OK
    return [client.command(f"RCPT TO:<{recipient}>") for recipient in recipients]


def transaction(client: RawLmtp, recipients: list[str], message: bytes, *, sender: str = SENDER) -> list[str]:
    """MAIL, RCPT..., DATA (after LHLO): return the replies after the final dot, one per accepted RCPT.

    ``message`` is sent as is, so it must carry its own dot-stuffing and final ``.`` line.
    """
    assert client.command(f"MAIL FROM:<{sender}>") == SENDER_OK
    accepted = sum(client.command(f"RCPT TO:<{recipient}>") == RECIPIENT_OK for recipient in recipients)
    assert client.command("DATA") == START_DATA
    client.send(message)
    return client.lines(accepted)


def make_full_mailbox(make_mailbox, address: str, settings) -> None:
    """A mailbox whose quota is exactly used up by one message delivered here."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""  # a warning would push usage past the quota
    filler = b"Subject: filler\r\n\r\n" + b"x" * 100 + b"\r\n"
    make_mailbox(address, quota_bytes=len(trace("", address)) + len(filler))
    assert deliver([address], [filler])[0].delivered


# --- One reply per recipient ---------------------------------------------------------------------


def test_mixed_recipients_get_their_own_rcpt_replies_and_one_data_reply_per_accepted_recipient(
    lmtp_server: LmtpProcess, make_mailbox, settings
) -> None:
    good, unknown, inactive, full, other = (
        "good@example.test",
        "unknown@example.test",
        "inactive@example.test",
        "full@example.test",
        "other@example.test",
    )
    make_mailbox(good)
    make_mailbox(other)
    make_mailbox(inactive)
    services.update_mailbox(Actor.cli(), inactive, active=False)
    make_full_mailbox(make_mailbox, full, settings)
    full_before = (counters(full)[:2], stored_messages(full))
    with lmtp_server.connect() as client:
        assert begin(client, [good, unknown, inactive, full, other]) == [
            RECIPIENT_OK,
            USER_UNKNOWN.format(rcpt=unknown),
            MAILBOX_DISABLED.format(rcpt=inactive),
            FULL_TEMPORARY.format(rcpt=full),
            RECIPIENT_OK,
        ]
        assert client.command("DATA") == START_DATA
        client.send(WIRE_MESSAGE)
        assert client.lines(2) == [SAVED.format(rcpt=good), SAVED.format(rcpt=other)]
        assert client.command("NOOP") == OK  # nothing more was sent for the refused recipients
        assert client.command("QUIT") == BYE
    assert stored_messages(good) == [trace(SENDER, good) + STORED_MESSAGE]
    assert stored_messages(other) == [trace(SENDER, other) + STORED_MESSAGE]
    assert stored_messages(inactive) == []
    assert (counters(full)[:2], stored_messages(full)) == full_before
    assert not Mailbox.objects.filter(user__username=unknown).exists()


def test_recipient_that_fills_up_between_rcpt_and_the_final_dot_gets_452_and_the_others_250(
    lmtp_server: LmtpProcess, make_mailbox, settings
) -> None:
    first, tight, last = "first@example.test", "tight@example.test", "last@example.test"
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    make_mailbox(first)
    make_mailbox(last)
    filler = b"Subject: filler\r\n\r\n" + b"f" * 500 + b"\r\n"
    filler_size = len(trace("", tight)) + len(filler)
    make_mailbox(tight, quota_bytes=filler_size)  # room for the filler, or for our message, not both
    with lmtp_server.connect() as client:
        assert begin(client, [first, tight, last]) == [RECIPIENT_OK] * 3
        assert client.command("DATA") == START_DATA
        client.send(WIRE_MESSAGE[:-3])  # all but the final dot
        assert deliver([tight], [filler])[0].delivered
        client.send(b".\r\n")
        assert client.lines(3) == [
            SAVED.format(rcpt=first),
            FULL_TEMPORARY.format(rcpt=tight),
            SAVED.format(rcpt=last),
        ]
        assert client.command("QUIT") == BYE
    assert stored_messages(tight) == [trace("", tight) + filler]
    assert counters(tight)[:2] == (filler_size, 1)
    for address in (first, last):
        assert stored_messages(address) == [trace(SENDER, address) + STORED_MESSAGE]


def test_a_mailbox_whose_uidls_collide_gets_451_and_the_other_recipients_250(
    lmtp_server: LmtpProcess, make_mailbox, settings
) -> None:
    """A mailbox whose next_uid went back (its next UIDL is taken) fails alone, not the group."""
    first, wedged, last = "first@example.test", "wedged@example.test", "last@example.test"
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    for address in (first, wedged, last):
        make_mailbox(address)
    assert deliver([wedged], [SMALL_MESSAGE])[0].delivered
    Mailbox.objects.filter(user__username=wedged).update(next_uid=1)
    wedged_before = (counters(wedged)[:2], stored_messages(wedged))
    with lmtp_server.connect() as client:
        client.send(b"LHLO client.test\r\n")
        client.reply()
        assert transaction(client, [first, wedged, last], WIRE_MESSAGE) == [
            SAVED.format(rcpt=first),
            TEMPORARY_FAILURE.format(rcpt=wedged),
            SAVED.format(rcpt=last),
        ]
        assert client.command("NOOP") == OK  # one reply per recipient, nothing more
        assert client.command("QUIT") == BYE
    for address in (first, last):
        assert stored_messages(address) == [trace(SENDER, address) + STORED_MESSAGE]
        size = len(trace(SENDER, address) + STORED_MESSAGE)
        assert counters(address)[:2] == (size, 1)
    assert (counters(wedged)[:2], stored_messages(wedged)) == wedged_before
    assert counters(wedged)[2] == sum(counters(address)[0] for address in (first, wedged, last))
    assert Mailbox.objects.get(user__username=wedged).next_uid == 1


def test_a_recipient_given_five_times_gets_five_replies_and_one_copy(
    lmtp_server: LmtpProcess, make_mailbox, settings
) -> None:
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    address = "alice@example.test"
    names = [address, "ALICE@example.test", address, "Alice@Example.test", address]
    make_mailbox(address)
    with lmtp_server.connect() as client:
        assert begin(client, names) == [RECIPIENT_OK] * 5
        assert client.command("DATA") == START_DATA
        client.send(WIRE_MESSAGE)
        assert client.lines(5) == [SAVED.format(rcpt=name) for name in names]
        assert client.command("NOOP") == OK
    assert stored_messages(address) == [trace(SENDER, address) + STORED_MESSAGE]
    assert counters(address)[:2] == (len(trace(SENDER, address) + STORED_MESSAGE), 1)


def test_pipelined_commands_and_message_are_answered_in_order(lmtp_server: LmtpProcess, make_mailbox) -> None:
    recipients = ["one@example.test", "two@example.test", "three@example.test"]
    for address in recipients:
        make_mailbox(address)
    with lmtp_server.connect() as client:
        client.send(
            b"LHLO client.test\r\nMAIL FROM:<> BODY=8BITMIME\r\n"
            + b"".join(f"RCPT TO:<{address}>\r\n".encode() for address in recipients)
            + b"DATA\r\n"
        )
        client.send(WIRE_MESSAGE + b"QUIT\r\n")  # without waiting for the 354
        transcript = client.read_until_closed().decode()
    expected = [
        *lhlo_reply(),
        SENDER_OK,
        *[RECIPIENT_OK] * 3,
        START_DATA,
        *[SAVED.format(rcpt=address) for address in recipients],
        BYE,
    ]
    assert transcript == "".join(line + "\r\n" for line in expected)
    for address in recipients:
        assert stored_messages(address) == [trace("", address) + STORED_MESSAGE]


# --- Failures: database down, dropped connections, a killed server ----------------------------------


def test_rcpt_gets_451_while_the_database_is_unreachable(tmp_path: Path) -> None:
    unreachable = "postgres://nobody@127.0.0.1:1/none"
    with running_lmtp(tmp_path / "lmtp", DATABASE_URL=unreachable) as server, server.connect() as client:
        assert begin(client, ["alice@example.test"]) == [DATABASE_DOWN]
        assert client.command("DATA") == NO_VALID_RECIPIENTS
        assert client.command("QUIT") == BYE


def refuses_connections(port: int) -> bool:
    """True once the listener is closed; a connect racing the close is reset instead of refused."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def half_a_message() -> bytes:
    return b"Subject: cut short\r\n\r\n" + b"0123456789" * 5000 + b"\r\n"


def test_connection_reset_mid_data_stores_nothing_and_the_server_keeps_delivering(
    lmtp_server: LmtpProcess, make_mailbox
) -> None:
    make_mailbox("alice@example.test", quota_bytes=10**6)
    before = counters("alice@example.test")
    with lmtp_server.connect() as client:
        assert begin(client, ["alice@example.test"]) == [RECIPIENT_OK]
        assert client.command("DATA") == START_DATA
        client.send(half_a_message())
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    assert counters("alice@example.test") == before
    with lmtp_server.connect() as client:
        client.send(b"LHLO client.test\r\n")
        client.reply()
        assert transaction(client, ["alice@example.test"], WIRE_MESSAGE) == [
            SAVED.format(rcpt="alice@example.test")
        ]
    assert stored_messages("alice@example.test") == [trace(SENDER, "alice@example.test") + STORED_MESSAGE]
    assert counters("alice@example.test")[:2] == (
        len(trace(SENDER, "alice@example.test") + STORED_MESSAGE),
        1,
    )


def test_server_killed_mid_data_stores_nothing_leaves_no_spool_file_and_a_new_one_delivers(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox("alice@example.test", quota_bytes=10**8)
    before = counters("alice@example.test")
    spool = tmp_path / "spool"
    spool.mkdir()
    with running_lmtp(tmp_path / "lmtp", TMPDIR=str(spool)) as server, server.connect() as client:
        assert begin(client, ["alice@example.test"], mail_parameters=" SIZE=6000000") == [RECIPIENT_OK]
        assert client.command("DATA") == START_DATA
        client.send(b"Subject: killed\r\n\r\n")
        for _ in range(3000):  # 3 MB of a 6 MB message: well past one chunk, so it spools to disk
            client.send(b"k" * 998 + b"\r\n")
        server.kill()
    assert stored_messages("alice@example.test") == []
    assert counters("alice@example.test") == before
    assert list(spool.iterdir()) == []
    with running_lmtp(tmp_path / "lmtp-again") as server:
        with server.smtplib_client() as lmtp:
            assert lmtp.sendmail(SENDER, ["alice@example.test"], SMALL_MESSAGE) == {}
    assert stored_messages("alice@example.test") == [trace(SENDER, "alice@example.test") + SMALL_MESSAGE]


IN_CREATE = 0x100  # <sys/inotify.h>
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class EntriesCreated:
    """The names created in one directory while watched (inotify): counted, not timed."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, str(directory).encode(), IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def names(self) -> list[str]:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        names, offset = [], 0
        while offset < len(data):
            *_, length = INOTIFY_EVENT.unpack_from(data, offset)
            offset += INOTIFY_EVENT.size
            names.append(data[offset : offset + length].rstrip(b"\0").decode())
            offset += length
        return names

    def close(self) -> None:
        os.close(self._fd)


def supports_unnamed_files(directory: Path) -> bool:
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_spooled_message_never_has_a_name_in_the_temporary_directory(
    tmp_path: Path, make_mailbox, workers: str
) -> None:
    """A server killed at any moment leaves nothing in TMPDIR.

    Spool files are opened without a name (``O_TMPFILE``). Python's first look for the
    temporary directory writes and removes a probe file: runlmtp does that before it listens,
    not in the middle of the first large message, where a kill would leave the probe behind.
    """
    make_mailbox("alice@example.test", quota_bytes=10**8)
    spool = tmp_path / "spool"
    spool.mkdir()
    if not supports_unnamed_files(spool):
        pytest.skip("this filesystem has no O_TMPFILE: spool files get a name for a moment")
    message = b"Subject: spooled\r\n\r\n" + (b"s" * 998 + b"\r\n") * 3000
    with running_lmtp(tmp_path / "lmtp", TMPDIR=str(spool), LMTP_WORKERS=workers) as server:
        created = EntriesCreated(spool)
        try:
            for _ in range(2):  # two connections: with two workers, most likely one on each
                with server.smtplib_client() as lmtp:
                    assert lmtp.sendmail(SENDER, ["alice@example.test"], message) == {}
            assert created.names() == []
        finally:
            created.close()
    assert len(stored_messages("alice@example.test")) == 2


def test_sigterm_ends_an_idle_session_with_421_and_the_server_exits_0(lmtp_server: LmtpProcess) -> None:
    with lmtp_server.connect() as client:
        client.send(b"LHLO client.test\r\n")
        assert client.reply() == lhlo_reply()
        lmtp_server.process.send_signal(signal.SIGTERM)
        assert client.read_until_closed() == f"{SHUTTING_DOWN}\r\n".encode()
    assert lmtp_server.process.wait(timeout=30) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_mid_data_delivers_that_message_then_closes_the_session(
    tmp_path: Path, make_mailbox, workers: str
) -> None:
    """With workers too: the supervisor keeps no copy of the listener that would still accept."""
    make_mailbox("alice@example.test")
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS=workers) as server, server.connect(timeout=2) as client:
        try:
            assert begin(client, ["alice@example.test"]) == [RECIPIENT_OK]
            assert client.command("DATA") == START_DATA
            client.send(WIRE_MESSAGE[:-3])
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: refuses_connections(server.port))  # shutdown has begun
            client.send(b".\r\n")
            assert client.line() == SAVED.format(rcpt="alice@example.test")
            assert client.read_until_closed() == f"{SHUTTING_DOWN}\r\n".encode()
            assert server.process.wait(timeout=5) == 0
        finally:
            if server.process.poll() is None:
                server.kill()
    assert stored_messages("alice@example.test") == [trace(SENDER, "alice@example.test") + STORED_MESSAGE]


# --- Concurrency, memory, quota warnings -------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_four_connections_never_overfill_a_mailbox_with_room_for_exactly_100(
    tmp_path: Path, make_mailbox, workers: str
) -> None:
    address = "race@example.test"
    body = b"Subject: race\r\n\r\n" + b"r" * 200 + b"\r\n"
    size = len(trace(SENDER, address)) + len(body)
    make_mailbox(address, quota_bytes=100 * size)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def connection(server: LmtpProcess) -> None:
        try:
            with server.smtplib_client(timeout=60) as lmtp:
                for _ in range(50):
                    try:
                        lmtp.sendmail(SENDER, [address], body)
                        outcome = "250"
                    except smtplib.SMTPRecipientsRefused as refused:
                        code, text = refused.recipients[address]
                        outcome = f"{code} {text.decode()}"
                    except smtplib.SMTPDataError as error:
                        outcome = f"{error.smtp_code} {error.smtp_error.decode()}"
                    with lock:
                        outcomes[outcome] += 1
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    settings = {"MAILADMIN_QUOTA_WARNING_PERCENTS": "", "LMTP_WORKERS": workers}
    with running_lmtp(tmp_path / "lmtp", **settings) as server:
        assert len(server.workers()) == (0 if workers == "1" else 2)
        threads = [threading.Thread(target=connection, args=(server,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert errors == []
    assert outcomes == {"250": 100, FULL_TEMPORARY.format(rcpt=address): 100}
    mailbox = Mailbox.objects.get(user__username=address)
    assert Message.objects.filter(mailbox=mailbox).count() == 100
    assert counters(address) == (100 * size, 100, 100 * size)
    assert len(set(Message.objects.filter(mailbox=mailbox).values_list("uidl", flat=True))) == 100


def test_a_worker_that_dies_takes_the_others_down_and_the_server_exits_1(
    tmp_path: Path, make_mailbox
) -> None:
    address = make_mailbox("survivor@example.test").address
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="3") as server:
        workers = server.workers()
        assert len(workers) == 3
        with server.smtplib_client() as lmtp:
            assert lmtp.sendmail(SENDER, [address], b"Subject: before\r\n\r\nx\r\n") == {}
        os.kill(workers[0], signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1
        assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
        assert "ended unexpectedly" in server.stderr_text()
    assert Message.objects.filter(mailbox__user__username=address).count() == 1


def big_message_blocks(total_bytes: int) -> tuple[bytes, bytes, int]:
    """(block as sent, block as stored, repeat count): LF lines, one dot-stuffed line per block."""
    lines = [b"0123456789abcdef" * 4 + b"\n"] * 1023
    sent = b"..dot-stuffed line\n" + b"".join(lines)
    stored = b".dot-stuffed line\r\n" + b"".join(line[:-1] + b"\r\n" for line in lines)
    return sent, stored, total_bytes // len(stored)


def test_a_30_mb_message_streams_into_the_store_in_bounded_server_memory(
    tmp_path: Path, make_mailbox
) -> None:
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="1") as lmtp_server:  # its memory: one process
        _stream_30_mb_message(lmtp_server, make_mailbox)


def _stream_30_mb_message(lmtp_server: LmtpProcess, make_mailbox) -> None:
    address = "big@example.test"
    make_mailbox(address)
    with lmtp_server.smtplib_client() as lmtp:  # warm-up: threads, imports and a connection exist
        assert lmtp.sendmail(SENDER, [address], SMALL_MESSAGE) == {}
    head = b"Subject: big\r\n\r\n"
    sent_block, stored_block, repeats = big_message_blocks(30 * 1024 * 1024)
    expected = hashlib.sha256(trace(SENDER, address) + head)
    for _ in range(repeats):
        expected.update(stored_block)
    expected_size = len(trace(SENDER, address)) + len(head) + repeats * len(stored_block)
    peak_before = lmtp_server.memory_kib("VmHWM")
    baseline = lmtp_server.reset_peak_memory()
    with lmtp_server.connect(timeout=120) as client:
        assert begin(client, [address], mail_parameters=f" SIZE={expected_size}") == [RECIPIENT_OK]
        assert client.command("DATA") == START_DATA
        client.send(head)
        for _ in range(repeats):
            client.send(sent_block)
        client.send(b".\r\n")
        assert client.line() == SAVED.format(rcpt=address)
        assert client.command("QUIT") == BYE
    peak_after = lmtp_server.memory_kib("VmHWM")
    growth = peak_after - baseline
    print(
        f"runlmtp VmHWM: {mebibytes(peak_before):.1f} MiB after warm-up, RSS {mebibytes(baseline):.1f} MiB "
        f"at reset, {mebibytes(peak_after):.1f} MiB after a {expected_size} byte message: "
        f"growth {mebibytes(growth):.1f} MiB"
    )
    assert growth < 32 * 1024
    message = Message.objects.get(mailbox__user__username=address, subject="big")
    assert message.size_bytes == expected_size
    actual = hashlib.sha256()
    stored_size = 0
    for chunk in iter_message_bytes(message.pk):
        actual.update(chunk)
        stored_size += len(chunk)
    assert (stored_size, actual.hexdigest()) == (expected_size, expected.hexdigest())


def test_quota_warnings_arrive_once_at_80_and_once_at_95_percent(
    lmtp_server: LmtpProcess, make_mailbox
) -> None:
    address = "warned@example.test"
    body = b"Subject: filling\r\n\r\n" + b"w" * 400 + b"\r\n"
    size = len(trace(SENDER, address)) + len(body)
    quota = 80 * size
    make_mailbox(address, quota_bytes=quota)
    mailbox = Mailbox.objects.get(user__username=address)

    def warnings() -> list[str]:
        return list(
            Message.objects.for_maildrop(mailbox)
            .filter(subject__startswith="Your mailbox is")
            .values_list("subject", flat=True)
        )

    steps: list[tuple[int, list[str]]] = []  # (usage before the delivery, warnings it brought)
    with lmtp_server.smtplib_client() as lmtp:
        while True:
            used_before = counters(address)[0]
            seen = warnings()
            try:
                lmtp.sendmail(SENDER, [address], body)
            except smtplib.SMTPRecipientsRefused as refused:  # at RCPT, from the SIZE smtplib declares
                assert refused.recipients[address] == (452, FULL_TEMPORARY.format(rcpt=address)[4:].encode())
                break
            except smtplib.SMTPDataError as error:  # at DATA: SIZE does not count the trace lines
                assert (error.smtp_code, error.smtp_error.decode()) == (
                    452,
                    FULL_TEMPORARY.format(rcpt=address)[4:],
                )
                break
            steps.append((used_before, warnings()[len(seen) :]))
            assert len(steps) <= 80
    for used_before, brought in steps:
        crossed = [p for p in (80, 95) if 100 * used_before < p * quota <= 100 * (used_before + size)]
        assert brought == ([WARNING_SUBJECT.format(percent=max(crossed))] if crossed else []), used_before
    assert warnings() == [WARNING_SUBJECT.format(percent=80), WARNING_SUBJECT.format(percent=95)]
    after_95 = next(
        i for i, (_, brought) in enumerate(steps) if brought == [WARNING_SUBJECT.format(percent=95)]
    )
    assert len(steps) - after_95 - 1 >= 2  # deliveries above 95 % happened, and brought nothing
    warning_rows = Message.objects.for_maildrop(mailbox).filter(subject__startswith="Your mailbox is")
    assert set(warning_rows.values_list("from_header", "envelope_sender")) == {
        ("postmaster@example.test", "")
    }


# --- Unix socket, port 25 ---------------------------------------------------------------------------


@pytest.fixture
def short_directory() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="lmtp-") as directory:
        yield Path(directory)


def test_unix_socket_gets_the_configured_mode_and_delivers(
    tmp_path: Path, short_directory: Path, make_mailbox
) -> None:
    make_mailbox("alice@example.test")
    path = short_directory / "lmtp.sock"
    with running_lmtp(tmp_path / "lmtp", socket_path=path, LMTP_SOCKET_MODE="600") as server:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with server.smtplib_client() as lmtp:
            assert lmtp.sendmail(SENDER, ["alice@example.test"], SMALL_MESSAGE) == {}
    assert not path.exists()  # removed at shutdown
    assert stored_messages("alice@example.test") == [trace(SENDER, "alice@example.test") + SMALL_MESSAGE]


def test_second_server_on_a_live_socket_refuses_to_start_and_the_first_keeps_delivering(
    tmp_path: Path, short_directory: Path, make_mailbox
) -> None:
    make_mailbox("alice@example.test")
    path = short_directory / "lmtp.sock"
    with running_lmtp(tmp_path / "first", socket_path=path) as first:
        with pytest.raises(RuntimeError, match="runlmtp exited with"):
            with running_lmtp(tmp_path / "second", socket_path=path) as second, second.connect() as client:
                assert client.command("QUIT") == BYE  # the second server now owns the path
        with first.smtplib_client() as lmtp:
            assert lmtp.sendmail(SENDER, ["alice@example.test"], SMALL_MESSAGE) == {}
    assert stored_messages("alice@example.test") == [trace(SENDER, "alice@example.test") + SMALL_MESSAGE]


def test_runlmtp_refuses_port_25() -> None:
    result = run_manage("runlmtp", "--port", "25")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == f"CommandError: {PORT_25_REFUSED}"


# --- The loop's statements (PostgreSQL) ----------------------------------------------------------


def loop_connections_last_statements() -> list[str]:
    """What each of runlmtp's loop connections to the test database sent last."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT query FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
            [loopsql.APPLICATION_NAME],
        )
        return [query for (query,) in cursor.fetchall()]


def test_on_postgresql_a_plain_delivery_goes_from_the_loop_and_an_alias_through_the_threads(
    tmp_path: Path, make_mailbox
) -> None:
    if connection.vendor != "postgresql":
        assert asyncio.run(loopsql.open_loop_statements(2)) is None  # SQLite: always the threads
        return
    make_mailbox("alice@example.test")
    aliases.create_alias(Actor.cli(), "team@example.test", ["alice@example.test"])
    # One worker with one connection for the loop: its last statement is the one asked last.
    with (
        running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="1", LMTP_DB_THREADS="1") as lmtp_server,
        lmtp_server.connect() as client,
    ):
        client.send(b"LHLO client.test\r\n")
        client.reply()
        assert transaction(client, ["alice@example.test"], WIRE_MESSAGE) == [
            SAVED.format(rcpt="alice@example.test")
        ]
        [sent] = loop_connections_last_statements()
        assert sent.startswith("WITH room AS MATERIALIZED"), sent  # the copy's statement
        assert client.command("MAIL FROM:<>") == SENDER_OK
        assert client.command("RCPT TO:<alice@example.test>") == RECIPIENT_OK
        assert client.command("RSET").startswith("250")
        [sent] = loop_connections_last_statements()
        assert sent.startswith('SELECT m."id"'), sent  # the look-up
        assert transaction(client, ["team@example.test"], WIRE_MESSAGE) == [
            SAVED.format(rcpt="team@example.test")
        ]
    assert len(stored_messages("alice@example.test")) == 2
