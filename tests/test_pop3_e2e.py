"""runpop3 end to end: raw sockets against real server processes on the test database.

Crash and abuse (kill -9, SIGTERM, kicks, STLS injection, over-long lines), the session and
failure rows the web side reads, and the resource bounds (argon2 concurrency, streaming RETR,
pipelining backpressure) measured on the server process itself.
"""

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from mailadmin.hosting import store
from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin.delivery import deliver
from mailadmin.models import AuthFailure, Mailbox, MaildropLease, Message, Pop3Node, Pop3Session
from pop3.protocol import TEXT_STLS_PIPELINED
from tests.conftest import run_manage
from tests.pop3_server import (
    PASSWORD,
    Pop3Process,
    mebibytes,
    pop3_server_fixture,  # noqa: F401 (the pop3_server fixture)
    running_pop3,
    sha256,
    unstuff,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ADDRESS = "alice@example.test"
LOGGED_IN = b"+OK Logged in.\r\n"
LOGGING_OUT = b"+OK Logging out.\r\n"
MARKED = b"+OK Marked to be deleted.\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
SHUTTING_DOWN = b"-ERR [SYS/TEMP] Server shutting down.\r\n"
KICKED = b"-ERR [SYS/TEMP] Disconnected by an administrator.\r\n"
MIB = 1024  # KiB per MiB: /proc figures are in KiB

MESSAGES = [
    b"Subject: first\r\n\r\nHello.\r\n.leading dot\r\n..two dots\r\n",
    b"Subject: second\r\nFrom: bob@example.test\r\n\r\n.\r\nA line that is only a dot, above.\r\n",
    b"Subject: third\r\n\r\nThird body.\r\n",
]


def deliver_all(address: str, messages: list[bytes]) -> list[int]:
    """Deliver each message; return the stored message ids in POP3 order."""
    for message in messages:
        assert deliver([address], [message])[0].delivered
    return list(
        Message.objects.for_maildrop(Mailbox.objects.get(user__username=address)).values_list("pk", flat=True)
    )


def stored(message_id: int) -> bytes:
    return b"".join(iter_message_bytes(message_id))


def counters(address: str) -> tuple[int, int, int]:
    mailbox = Mailbox.objects.select_related("domain").get(user__username=address)
    return mailbox.used_bytes, mailbox.used_messages, mailbox.domain.used_bytes


def open_session_row(address: str) -> Pop3Session | None:
    """The live session row of a mailbox once the monitor has written its login."""
    return Pop3Session.objects.filter(mailbox__user__username=address, ended_at__isnull=True).first()


def ended_session_row(username: str) -> Pop3Session | None:
    return Pop3Session.objects.filter(username=username, ended_at__isnull=False).first()


# --- STLS injection and line limits ------------------------------------------------------------


def test_command_pipelined_behind_stls_is_refused_and_never_answered(pop3_server: Pop3Process) -> None:
    with pop3_server.connect() as client:
        client.send(b"STLS\r\nCAPA\r\n")  # one send(): both lines reach the server together
        received = client.read_until_closed()
    assert received == f"-ERR {TEXT_STLS_PIPELINED}\r\n".encode()


def test_plaintext_sent_instead_of_a_client_hello_fails_the_handshake_and_gets_no_reply(
    pop3_server: Pop3Process,
) -> None:
    with pop3_server.connect() as client:
        assert client.command("STLS") == b"+OK Begin TLS negotiation now.\r\n"
        client.send(b"CAPA\r\n")
        received = client.read_until_closed()
    # At most a TLS alert record (content type 21); never a POP3 reply, never the CAPA listing.
    assert received == b"" or received[0] == 21, received
    assert b"+OK" not in received and b"-ERR" not in received and b"USER" not in received
    row = wait_for(lambda: ended_session_row(""))
    assert row.end_reason == "dropped"


def test_over_long_line_before_login_is_refused_and_the_connection_closed(pop3_server: Pop3Process) -> None:
    with pop3_server.connect() as client:
        client.send(b"A" * 3000)
        assert client.read_until_closed() == b"-ERR Input line too long.\r\n"


# --- Authentication --------------------------------------------------------------------------


def test_wrong_password_unknown_user_and_inactive_mailbox_get_the_same_reply(
    pop3_server: Pop3Process, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    inactive = make_mailbox("carol@example.test")
    Mailbox.objects.filter(pk=inactive.pk).update(active=False)
    replies = {}
    for case, username, password in [
        ("wrong password", ADDRESS, "not the password"),
        ("unknown user", "nobody@example.test", "correct horse"),
        ("inactive mailbox", "carol@example.test", "correct horse"),
    ]:
        with pop3_server.connect() as client:
            replies[case] = client.login(username, password)
    assert replies == dict.fromkeys(replies, AUTH_FAILED)


def test_failed_login_leaves_a_failure_row_without_the_password(
    pop3_server: Pop3Process, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    password = "Tr0ub4dor-wrong-9f2c"
    with pop3_server.connect() as client:
        assert client.login(ADDRESS, password) == AUTH_FAILED
        assert client.command("QUIT") == LOGGING_OUT
    failure = AuthFailure.objects.get()
    assert (failure.reason, failure.username, failure.peer_host, failure.mechanism) == (
        "bad credentials",
        ADDRESS,
        "127.0.0.1",
        "USER",
    )
    session = wait_for(lambda: ended_session_row(ADDRESS))
    assert session.authenticated_at is None
    for row in [AuthFailure.objects.values().get(), Pop3Session.objects.values().get()]:
        text = " ".join(str(value) for value in row.values())
        assert password not in text
        assert password.lower() not in text.lower()


def test_session_row_records_the_login_two_retrievals_and_the_quit(
    pop3_server: Pop3Process, make_mailbox
) -> None:
    mailbox = make_mailbox(ADDRESS)
    deliver_all(ADDRESS, MESSAGES[:2])
    with pop3_server.connect() as client:
        assert client.login(ADDRESS) == LOGGED_IN
        client.retr(1)
        client.retr(2)
        assert client.command("QUIT") == LOGGING_OUT
        assert client.read_until_closed() == b""
    row = wait_for(lambda: ended_session_row(ADDRESS))
    assert (row.username, row.mailbox_id, row.peer_host, row.local_host, row.local_port) == (
        ADDRESS,
        mailbox.pk,
        "127.0.0.1",
        "127.0.0.1",
        pop3_server.port,
    )
    assert (row.retr_count, row.deleted_count, row.message_count, row.end_reason) == (2, 0, 2, "quit")
    assert row.authenticated_at is not None and row.started_at <= row.authenticated_at <= row.ended_at


def test_session_row_retr_bytes_are_every_byte_the_retrievals_sent(
    pop3_server: Pop3Process, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    deliver_all(ADDRESS, MESSAGES[:2])
    sent = 0
    with pop3_server.connect() as client:
        assert client.login(ADDRESS) == LOGGED_IN
        for number in (1, 2):
            status, body = client.retr(number)
            sent += len(status) + len(body)
        assert client.command("QUIT") == LOGGING_OUT
    row = wait_for(lambda: ended_session_row(ADDRESS))
    print(f"retr bytes on the wire: {sent}; recorded: {row.retr_bytes}")
    assert row.retr_bytes == sent


# --- Locks across processes, crashes, shutdown -------------------------------------------------


def test_second_server_refuses_a_locked_mailbox_until_the_first_session_quits(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    deliver_all(ADDRESS, MESSAGES[:1])
    with (
        running_pop3(tmp_path / "a") as server_a,
        running_pop3(tmp_path / "b") as server_b,
        server_a.connect() as first,
        server_b.connect() as second,
    ):
        assert first.login(ADDRESS) == LOGGED_IN
        started = time.monotonic()
        assert second.login(ADDRESS) == IN_USE  # within the 5 s socket timeout
        print(f"[IN-USE] answered in {time.monotonic() - started:.3f} s")
        assert first.command("QUIT") == LOGGING_OUT
        assert first.read_until_closed() == b""  # the lease is released before the close
        assert second.login(ADDRESS) == LOGGED_IN
        assert second.command("STAT") == f"+OK 1 {len(stored(Message.objects.get().pk))}\r\n".encode()


def test_killed_server_keeps_every_message_and_its_lease_lapses_after_the_ttl(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    ids = deliver_all(ADDRESS, MESSAGES)
    before = counters(ADDRESS)
    with running_pop3(tmp_path / "survivor", POP3_LEASE_TTL="2") as survivor:
        with running_pop3(tmp_path / "victim", POP3_LEASE_TTL="2") as victim, victim.connect() as client:
            assert client.login(ADDRESS) == LOGGED_IN
            assert client.command("DELE 1") == MARKED
            victim.kill()
            killed_at = time.monotonic()
        assert list(Message.objects.order_by("pk").values_list("pk", flat=True)) == ids
        assert counters(ADDRESS) == before
        with survivor.connect() as client:
            assert client.login(ADDRESS) == IN_USE  # the dead session's lease has not lapsed yet

        def login_succeeds() -> bool:
            with survivor.connect() as client:
                reply = client.login(ADDRESS)
                assert reply in (LOGGED_IN, IN_USE), reply
                return reply == LOGGED_IN

        wait_for(login_succeeds, timeout=10, interval=0.2)
        print(f"lease lapsed {time.monotonic() - killed_at:.2f} s after kill -9 (POP3_LEASE_TTL=2)")
    assert Message.objects.count() == len(MESSAGES)
    assert counters(ADDRESS) == before


def test_sigterm_ends_a_transaction_without_applying_deletions_and_releases_the_lease(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    ids = deliver_all(ADDRESS, MESSAGES)
    before = counters(ADDRESS)
    with running_pop3(tmp_path) as server, server.connect() as client:
        assert client.login(ADDRESS) == LOGGED_IN
        assert client.command("DELE 1") == MARKED
        assert client.command("DELE 2") == MARKED
        assert server.terminate() == 0
        assert client.read_until_closed() == SHUTTING_DOWN
    assert list(Message.objects.order_by("pk").values_list("pk", flat=True)) == ids
    assert counters(ADDRESS) == before
    assert MaildropLease.objects.count() == 0
    row = Pop3Session.objects.get(username=ADDRESS)
    assert (row.end_reason, row.deleted_count) == ("shutdown", 0)


class _RollBack(Exception):
    pass


# On x86-64: flock, and nanosleep, clock_nanosleep: a write transaction polling for the writer
# lock (mailadmin.sqlite), or SQLite's busy wait for a statement outside a transaction.
WAITING_SYSCALLS = {"73", "35", "230"}


def threads_waiting_to_write(pid: int) -> int:
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            count += (task / "syscall").read_text().split(" ")[0] in WAITING_SYSCALLS
        except OSError:
            pass  # the thread ended meanwhile
    return count


def wait_until_lease_insert_blocks(server: Pop3Process) -> None:
    """Wait until the server's login is stuck taking the lease behind the test's transaction."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:

            def blocked() -> bool:
                cursor.execute("SELECT pg_stat_clear_snapshot()")  # the view is frozen per transaction
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%mailadmin_maildroplease%%' AND pid <> pg_backend_pid()"
                )
                return cursor.fetchone()[0] == 1

            wait_for(blocked)
    else:
        # The monitor's tick (every 0.2 s) and the login's lease are then the two threads
        # waiting for the write lock in the server.
        wait_for(lambda: threads_waiting_to_write(server.pid) >= 2)


def test_sigterm_during_a_login_waiting_for_the_lock_leaves_no_lease_behind(
    tmp_path: Path, make_mailbox
) -> None:
    mailbox = make_mailbox(ADDRESS)
    # One process: the test watches its threads wait for the write lock.
    with running_pop3(tmp_path, POP3_WORKERS="1") as server, server.connect(timeout=10) as client:
        now = timezone.now()
        try:
            with transaction.atomic():
                # Holds the lease's unique key (PostgreSQL) or the write lock (SQLite) until rolled back.
                MaildropLease.objects.create(
                    mailbox=mailbox, owner="test-blocker", node="test", acquired_at=now, expires_at=now
                )
                client.send(f"USER {ADDRESS}\r\nPASS {PASSWORD}\r\n".encode())
                assert client.line() == b"+OK\r\n"
                wait_until_lease_insert_blocks(server)
                server.process.send_signal(signal.SIGTERM)
                assert client.line() == SHUTTING_DOWN
                raise _RollBack
        except _RollBack:
            pass
        assert server.process.wait(timeout=30) == 0
    leases = list(MaildropLease.objects.values_list("node", flat=True))
    print(f"leases left after the shutdown: {leases}")
    assert leases == []


def _kickpop3(address: str) -> None:
    result = run_manage("kickpop3", address)
    assert (result.returncode, result.stdout) == (0, b"kick requested for 1 session\n"), result.stderr


def _setpassword(address: str) -> None:
    result = run_manage("setpassword", address, "--password-stdin", input=b"new-horse-battery\n")
    assert result.returncode == 0, result.stderr


def _deactivate(address: str) -> None:
    assert Mailbox.objects.filter(user__username=address).update(active=False) == 1


@pytest.mark.parametrize(
    "end_it", [_kickpop3, _setpassword, _deactivate], ids=["kickpop3", "setpassword", "deactivate"]
)
def test_administrator_action_ends_a_live_session_without_applying_deletions(
    pop3_server: Pop3Process, make_mailbox, end_it
) -> None:
    make_mailbox(ADDRESS)
    ids = deliver_all(ADDRESS, MESSAGES)
    before = counters(ADDRESS)
    with pop3_server.connect() as client:
        assert client.login(ADDRESS) == LOGGED_IN
        assert client.command("DELE 1") == MARKED
        wait_for(lambda: open_session_row(ADDRESS))  # the monitor has written the login
        started = time.monotonic()
        end_it(ADDRESS)  # the commands take about a second to start Django; the kick lands meanwhile
        acted = time.monotonic()
        assert client.line() == KICKED  # within the 5 s socket timeout; POP3_MONITOR_INTERVAL is 0.2 s
        print(
            f"{end_it.__name__}: session ended {time.monotonic() - started:.3f} s after the action started "
            f"({acted - started:.3f} s of it running the action)"
        )
        assert client.read_until_closed() == b""
    assert list(Message.objects.order_by("pk").values_list("pk", flat=True)) == ids
    assert counters(ADDRESS) == before
    row = wait_for(lambda: ended_session_row(ADDRESS))
    assert (row.end_reason, row.deleted_count) == ("kicked", 0)
    assert wait_for(lambda: MaildropLease.objects.count() == 0, timeout=5)


def next_monitor_tick(node_pid: int, timeout: float = 10.0) -> None:
    """Return just after the server's monitor committed a tick (its heartbeat moved)."""
    node = Pop3Node.objects.filter(name__endswith=f":{node_pid}")
    first = wait_for(lambda: node.values_list("heartbeat_at", flat=True).first(), timeout=timeout)
    wait_for(lambda: node.filter(heartbeat_at__gt=first).exists(), timeout=timeout, interval=0.01)


def test_deleting_a_mailbox_right_after_its_login_does_not_stall_the_monitor(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    make_mailbox("bob@example.test")
    # One process: the test times the login against its monitor's tick.
    with running_pop3(tmp_path, POP3_MONITOR_INTERVAL="2", POP3_WORKERS="1") as server:
        with server.connect() as doomed:
            next_monitor_tick(server.pid)  # ~2 s until the next one: the login update stays queued
            assert doomed.login(ADDRESS) == LOGGED_IN
            store.delete_mailbox(ADDRESS)
            assert doomed.line() == KICKED  # the monitor ends sessions of deleted mailboxes
        with server.connect() as other:
            assert other.login("bob@example.test") == LOGGED_IN
            assert wait_for(lambda: open_session_row("bob@example.test"), timeout=10)


# --- Resource bounds -------------------------------------------------------------------------

ARGON2_MIB = 110  # Django's argon2 memory_cost is 100 MiB per verification; slack on top
FLOOD = 50


def test_fifty_concurrent_wrong_passwords_neither_block_the_loop_nor_run_more_than_two_hashes(
    tmp_path: Path, make_mailbox
) -> None:
    victim = make_mailbox(ADDRESS)
    assert victim.user.password.startswith("argon2$")  # the production hasher, ~100 MiB per check
    make_mailbox("pinger@example.test")
    with running_pop3(tmp_path, POP3_AUTH_THREADS="2", POP3_WORKERS="1") as server:  # its memory
        baseline = server.memory_kib("VmHWM")
        pinger = server.connect()
        assert pinger.login("pinger@example.test") == LOGGED_IN
        latencies: list[float] = []
        noop_replies: list[bytes] = []
        # For each NOOP answered, how many of the wrong logins had been answered by then.
        logins_answered_at_noop: list[int] = []
        logins_answered: list[bytes] = []
        stop = threading.Event()

        def ping() -> None:
            while not stop.is_set():
                started = time.monotonic()
                noop_replies.append(pinger.command("NOOP"))
                latencies.append(time.monotonic() - started)
                logins_answered_at_noop.append(len(logins_answered))
                time.sleep(0.05)

        def wrong_login(number: int) -> bytes:
            with server.connect(timeout=120) as client:
                reply = client.login(ADDRESS, f"wrong password {number}")
            logins_answered.append(reply)
            return reply

        ping_thread = threading.Thread(target=ping)
        ping_thread.start()
        flood_started = time.monotonic()
        try:
            with ThreadPoolExecutor(FLOOD) as pool:
                replies = list(pool.map(wrong_login, range(FLOOD)))
        finally:
            stop.set()
            ping_thread.join()
        flood_seconds = time.monotonic() - flood_started
        assert pinger.command("QUIT") == LOGGING_OUT
        pinger.close()
        peak = server.memory_kib("VmHWM")
    print(
        f"{FLOOD} wrong logins in {flood_seconds:.2f} s; {len(latencies)} NOOPs, worst latency "
        f"{max(latencies) * 1000:.1f} ms; server VmHWM {mebibytes(baseline):.0f} MiB at start, "
        f"{mebibytes(peak):.0f} MiB peak (+{mebibytes(peak - baseline):.0f} MiB)"
    )
    assert replies == [AUTH_FAILED] * FLOOD
    assert noop_replies == [b"+OK\r\n"] * len(latencies)
    # The loop kept answering while the hashes ran: NOOPs came back between the first and the
    # last failed login, not only before the flood or after it (latency figures: the bench).
    during_flood = [n for n in logins_answered_at_noop if 0 < n < FLOOD]
    assert len(during_flood) >= 5
    assert peak < baseline + 3 * ARGON2_MIB * MIB


def big_message_lines(size: int) -> Iterator[bytes]:
    """A message of about ``size`` bytes; every 7th line starts with a dot, to be stuffed."""
    yield b"Subject: big\r\n\r\n"
    produced = 0
    number = 0
    while produced < size:
        line = b"%s%08d the quick brown fox jumps over the lazy dog 0123456789\r\n" % (
            b"." if number % 7 == 0 else b"",
            number,
        )
        produced += len(line)
        number += 1
        yield line


def test_retr_of_a_25_mb_message_to_a_slow_reader_streams_in_bounded_memory(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    assert deliver([ADDRESS], big_message_lines(25 * 1000 * 1000))[0].delivered
    message = Message.objects.get()
    expected = sha256(iter_message_bytes(message.pk))
    with (
        running_pop3(tmp_path, POP3_WORKERS="1") as pop3_server,  # its memory: one process
        pop3_server.connect(timeout=30) as client,
    ):
        assert client.login(ADDRESS) == LOGGED_IN
        rss_before = pop3_server.reset_peak_memory()
        client.send(b"RETR 1\r\n")
        raw = bytearray()
        while not raw.endswith(b"\r\n.\r\n"):
            piece = client.sock.recv(64 * 1024)
            assert piece, "closed in the middle of RETR"
            raw += piece
            if len(raw) < 4 * 1024 * 1024:
                time.sleep(0.005)  # a slow reader at first: the server must wait, not buffer
        peak = pop3_server.memory_kib("VmHWM")
        assert client.command("QUIT") == LOGGING_OUT
    status, _, body = bytes(raw).partition(b"\r\n")
    assert status == f"+OK {message.size_bytes} octets".encode()
    content = unstuff(body)
    assert len(content) == message.size_bytes
    assert sha256([content]) == expected
    growth = peak - rss_before
    print(
        f"RETR of {message.size_bytes} bytes: server RSS {mebibytes(rss_before):.1f} MiB, "
        f"peak growth {mebibytes(growth):.1f} MiB"
    )
    # Queueing the whole message in the transport costs ~21 MiB (measured: 100 writes of 256 KiB
    # to a reader that does not read), so a 32 MiB bound could not fail; streaming costs ~3 MiB.
    assert growth < 12 * MIB


def test_two_hundred_pipelined_retrs_to_a_client_not_reading_are_all_answered_in_bounded_memory(
    tmp_path: Path, make_mailbox
) -> None:
    make_mailbox(ADDRESS)
    assert deliver([ADDRESS], big_message_lines(200 * 1000))[0].delivered
    message = Message.objects.get()
    expected = stored(message.pk)
    count = 200
    with (
        running_pop3(tmp_path, POP3_WORKERS="1") as pop3_server,  # its memory: one process
        pop3_server.connect(timeout=30) as client,
    ):
        assert client.login(ADDRESS) == LOGGED_IN
        rss_before = pop3_server.reset_peak_memory()
        client.send(b"RETR 1\r\n" * count)
        time.sleep(1.0)  # not reading: the server must stop, not queue 40 MB of replies
        stalled = pop3_server.memory_kib("VmHWM")
        for number in range(count):
            status, body = client.retr_reply()
            assert status == f"+OK {message.size_bytes} octets\r\n".encode(), number
            assert unstuff(body) == expected, number
        peak = pop3_server.memory_kib("VmHWM")
        assert client.command("QUIT") == LOGGING_OUT
    print(
        f"{count} pipelined RETRs of {message.size_bytes} bytes: server RSS {mebibytes(rss_before):.1f} MiB, "
        f"peak growth {mebibytes(stalled - rss_before):.1f} MiB while stalled, "
        f"{mebibytes(peak - rss_before):.1f} MiB overall"
    )
    assert peak - rss_before < 32 * MIB


def test_two_workers_share_the_listeners_and_a_dead_worker_stops_the_server(
    tmp_path: Path, make_mailbox
) -> None:
    """runpop3 --workers 2: both processes serve logins; kill one and the other follows, exit 1."""
    addresses = [make_mailbox(f"user{n}@example.test").address for n in range(8)]
    with running_pop3(tmp_path, POP3_WORKERS="2") as server:
        workers = [
            int(pid) for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        ]
        assert len(workers) == 2
        sessions = [server.connect() for _ in addresses]  # held open together: accepts spread out
        assert [client.login(address) for client, address in zip(sessions, addresses, strict=True)] == [
            LOGGED_IN
        ] * 8
        logged_in = Pop3Session.objects.filter(ended_at__isnull=True, authenticated_at__isnull=False)
        wait_for(lambda: logged_in.count() == 8)
        assert {node.rsplit(":", 1)[1] for node in logged_in.values_list("node", flat=True)} <= {
            str(pid) for pid in workers
        }
        for client in sessions:
            assert client.command("QUIT") == LOGGING_OUT
            client.close()
        os.kill(workers[0], signal.SIGKILL)
        assert server.process.wait(timeout=30) == 1
        assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
