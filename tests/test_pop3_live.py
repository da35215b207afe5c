"""Session records, leases and resilience of the ORM side of runpop3."""

import asyncio
import io
import logging
import resource
import threading
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connection, connections
from django.db.models.functions import Now
from django.utils import timezone

from mailadmin.executors import BoundedExecutor, keep_connections_open
from mailadmin.hosting import store
from mailadmin.mailin.delivery import deliver
from mailadmin.management.commands import runpop3
from mailadmin.management.commands.runpop3 import TEXT_LOCKS_LOST
from mailadmin.models import MaildropLease, Message, Pop3Session
from mailadmin.pop3d import feed
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.maildrop import OrmMaildrop, snapshot
from mailadmin.pop3d.registry import Pop3Monitor, backoff_delay, printable
from pop3 import mailbox as pop3_mailbox
from pop3.mailbox import ConnectionInfo, EndReason, LoginFailure, LoginRequest, MaildropError, SessionStats
from tests.daemons import free_port
from tests.test_pop3_auth import PASSWORD, authenticator_on

NODE = "testhost:1"


def test_printable_escapes_control_and_format_characters():
    assert printable("evil\r\nFAKE LOG LINE\x00\u202e") == "evil??FAKE LOG LINE??"
    assert printable("plain@example.test") == "plain@example.test"


def monitor_on(
    executor: BoundedExecutor, leases: LeaseKeeper | None = None, *, interval: float = 1.0
) -> Pop3Monitor:
    leases = leases or LeaseKeeper(executor, node=NODE, ttl_seconds=60)
    return Pop3Monitor(executor, leases, node=NODE, interval=interval, on_give_up=lambda: None)


def terminate_other_backends(ours=connection) -> None:
    """What a PostgreSQL restart does to every open connection of the test database but ours.

    Each call waits until the backend has gone (PostgreSQL 14+), so the next query finds it gone.
    Inside an event loop ``connection`` is another one than the test's: pass the test's own.
    """
    with ours.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def needs_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("terminating the server's connections needs PostgreSQL; SQLite has no server")


@pytest.fixture
def daemon_connections():
    """Threads started by the test connect as runpop3's do: kept open, health-checked."""
    saved = {alias: dict(database) for alias, database in settings.DATABASES.items()}
    keep_connections_open(settings.DAEMON_DB_CONN_MAX_AGE)
    yield
    for alias, database in settings.DATABASES.items():
        database.update(saved[alias])
    if connection.vendor == "postgresql":
        terminate_other_backends()  # no test thread keeps a connection to the test database


class FakeSession:
    def __init__(self) -> None:
        self.kicked: list[EndReason] = []

    def kick(self, reason: EndReason) -> bool:
        self.kicked.append(reason)
        return True


@pytest.mark.django_db(transaction=True)
def test_a_session_row_follows_the_session_and_one_escaped_line_is_logged(caplog):
    monitor = monitor_on(BoundedExecutor(1, "test-db"))
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
        "session=<0123456789abcdef0123456789abcdef> user=<mallory\\x0d\\x0auser\\x3d\\x3croot\\x3e> "
        "rip=192.0.2.7 lip=192.0.2.1: dropped top=0/0, retr=0/0, del=0/0, size=0, in=60, out=120"
    ]


def test_a_user_name_cannot_forge_a_field_of_the_session_log_line(caplog):
    monitor = monitor_on(BoundedExecutor(1, "test-db"))
    recorder = monitor.recorder(FakeSession())
    info = ConnectionInfo(("192.0.2.7", 40000), ("192.0.2.1", 110), False, "0123456789abcdef0123456789abcdef")
    recorder.opened(info)
    forged = "x> rip=203.0.113.66 lip=127.0.0.1: auth-failed"
    recorder.login_failed(forged, LoginFailure.BAD_CREDENTIALS, "USER")
    with caplog.at_level(logging.INFO, logger="mailadmin.pop3"):
        recorder.closed(EndReason.DROPPED, SessionStats())
    assert caplog.messages == [
        "session=<0123456789abcdef0123456789abcdef> "
        "user=<x\\x3e\\x20rip\\x3d203.0.113.66\\x20lip\\x3d127.0.0.1:\\x20auth-failed> "
        "rip=192.0.2.7 lip=192.0.2.1: dropped top=0/0, retr=0/0, del=0/0, size=0, in=0, out=0"
    ]
    assert caplog.messages[0].count("rip=") == 1


@pytest.mark.django_db(transaction=True)
def test_maildrop_reads_survive_the_database_dropping_its_connections(make_mailbox):
    if connection.vendor != "postgresql":
        pytest.skip("terminating server-side connections needs PostgreSQL")
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: a\r\n\r\nsurvives\r\n"])
    executor = BoundedExecutor(1, "test-db")
    lease = LeaseKeeper(executor, node=NODE, ttl_seconds=60).lease(mailbox.pk)
    assert lease.acquire()
    maildrop = OrmMaildrop(executor, lease, snapshot(mailbox.pk))

    async def read() -> bytes:
        return b"".join([chunk async for chunk in maildrop.read(maildrop.messages[0])])

    first = asyncio.run(read())
    terminate_other_backends()
    assert asyncio.run(read()) == first
    assert first.endswith(b"survives\r\n")


def test_the_session_end_reasons_are_the_pop3_ones_plus_lost():
    assert Pop3Session.EndReason.values == [reason.value for reason in pop3_mailbox.EndReason] + ["lost"]
    assert [Pop3Session.EndReason(reason.value).name for reason in pop3_mailbox.EndReason] == [
        reason.name for reason in pop3_mailbox.EndReason
    ]


def test_the_back_off_doubles_per_failed_tick_up_to_a_quarter_of_the_lease_ttl():
    now = 1000.5
    delays = [backoff_delay(failures, 1.0, 60.0, now) for failures in range(6)]
    assert delays == [0.5, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert backoff_delay(5000, 1.0, 60.0, now) == 15.0
    assert backoff_delay(3, 2.0, 4.0, now) == 2.0  # never below the interval
    assert backoff_delay(2, 1.0, 60.0, 1000.75) == 4.0  # a failed tick is not put on the beat


def test_ticks_that_succeed_start_on_the_wall_clocks_beat_however_long_each_took():
    """Every process ticks at the same instants, so the live page's look after them finds the
    rows of all of them (free-running ticks made a login's p95 to the page up to 2.04 s)."""
    assert backoff_delay(0, 1.0, 60.0, 1000.25) == 0.75
    assert backoff_delay(0, 2.0, 60.0, 1001.0) == 1.0
    assert backoff_delay(0, 5.0, 60.0, 1003.0) == 2.0
    # Two processes that finished their ticks at different times start the next one together.
    assert {now + backoff_delay(0, 1.0, 60.0, now) for now in (1000.125, 1000.5, 1000.625)} == {1001.0}
    # A tick that ends just before a beat, or on it, is followed a quarter interval later (a beat
    # skipped would leave the page a whole interval behind a slow database).
    assert backoff_delay(0, 1.0, 60.0, 1000.875) == 0.25
    assert backoff_delay(0, 1.0, 60.0, 1000.0) == 0.25


def test_a_beat_is_a_multiple_of_its_period_plus_its_offset():
    assert feed.seconds_to_beat(0.5, 1000.0, after=0.125) == 0.125
    assert feed.seconds_to_beat(0.5, 1000.25, after=0.125) == 0.375
    assert feed.seconds_to_beat(0.5, 1000.125, after=0.125) == 0.0
    assert feed.seconds_to_beat(1.0, 999.5) == 0.5


class FlakyExecutor(BoundedExecutor):
    """The database executor through an outage: the runs numbered in ``failing`` raise ``error``.

    ``enough`` is set at run number ``enough_runs``.
    """

    def __init__(self, failing: set[int], error: type[Exception], enough_runs: int) -> None:
        super().__init__(1, "test-db")
        self.failing = failing
        self.error = error
        self.enough_runs = enough_runs
        self.enough = asyncio.Event()
        self.runs = 0
        self.done: list[str] = []

    async def run(self, function, *args):
        self.runs += 1
        if self.runs == self.enough_runs:
            self.enough.set()
        if self.runs in self.failing:
            raise self.error("the database is restarting")
        result = await super().run(function, *args)
        self.done.append(function.__name__)
        return result


async def until_set(event: asyncio.Event, task: asyncio.Task) -> None:
    """Wait for ``event``; fail instead of hanging if ``task`` ends first."""
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if not event.is_set():
        waiter.cancel()
        pytest.fail(f"the monitor stopped early: {task!r}")


def lease_seconds_left() -> float:
    return (MaildropLease.objects.get().expires_at - timezone.now()).total_seconds()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("failing", "error"),
    [({1, 2, 3}, OperationalError), ({3, 4, 5}, InterfaceError), ({3, 4, 5}, RuntimeError)],
    ids=["at-start", "mid-run-interface-error", "mid-run-bug"],
)
def test_the_monitor_logs_and_goes_on_through_an_outage(make_mailbox, caplog, failing, error):
    mailbox = make_mailbox()
    executor = FlakyExecutor(failing, error, enough_runs=9)
    monitor = monitor_on(executor, interval=0.001)
    assert monitor.leases.lease(mailbox.pk).acquire()
    MaildropLease.objects.update(expires_at=timezone.now() + timedelta(seconds=1))  # about to lapse

    async def scenario() -> None:
        monitor.start()
        await until_set(executor.enough, monitor._task)
        await monitor.stop()

    with caplog.at_level(logging.WARNING, logger="mailadmin.pop3"):
        asyncio.run(scenario())
    assert len(caplog.records) == 3  # one line per failed tick
    assert executor.done.count("sync_node") >= 5  # heartbeats after the outage, renewals among them
    assert lease_seconds_left() > 50
    assert monitor.gave_up is False


class OutageExecutor(BoundedExecutor):
    """A database that never answers, on a clock that moves ten seconds per attempt."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__(1, "test-db")
        self.clock = clock
        self.runs = 0

    async def run(self, function, *args):
        self.runs += 1
        self.clock[0] += 10.0
        raise OperationalError("connection refused")


@pytest.mark.django_db(transaction=True)
def test_the_monitor_gives_up_once_a_held_lease_went_unrenewed_for_its_ttl(make_mailbox):
    clock = [0.0]
    executor = OutageExecutor(clock)
    leases = LeaseKeeper(executor, node=NODE, ttl_seconds=60, clock=lambda: clock[0])
    assert leases.lease(make_mailbox().pk).acquire()  # confirmed at 0.0
    gave_up: list[bool] = []
    monitor = Pop3Monitor(
        executor, leases, node=NODE, interval=0.001, on_give_up=lambda: gave_up.append(True)
    )

    async def scenario() -> None:
        monitor.start()
        await monitor._task

    asyncio.run(scenario())
    assert (executor.runs, clock[0], gave_up, monitor.gave_up) == (7, 70.0, [True], True)


@pytest.mark.django_db(transaction=True)
def test_runpop3_stops_serving_and_exits_non_zero_when_its_monitor_gives_up(monkeypatch, daemon_connections):
    monkeypatch.setattr(LeaseKeeper, "lapsed", lambda keeper: True)
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit:
        call_command("runpop3", port=free_port(), tls_port=0, workers=1, stdout=io.StringIO(), stderr=stderr)
    assert (exit.value.code, stderr.getvalue()) == (1, TEXT_LOCKS_LOST + "\n")


class SilentExecutor(BoundedExecutor):
    """A database that neither answers nor fails."""

    def __init__(self) -> None:
        super().__init__(1, "test-db")
        self.runs = 0

    async def run(self, function, *args):
        self.runs += 1
        await asyncio.get_running_loop().create_future()


@pytest.mark.django_db(transaction=True)
def test_the_monitor_gives_up_when_a_tick_hangs_past_the_lease_ttl(make_mailbox):
    executor = SilentExecutor()
    leases = LeaseKeeper(executor, node=NODE, ttl_seconds=0.05)
    assert leases.lease(make_mailbox().pk).acquire()
    monitor = monitor_on(executor, leases)

    async def scenario() -> None:
        monitor.start()
        await asyncio.wait({monitor._task}, timeout=30)  # a bound against hanging, not a measure

    asyncio.run(scenario())
    assert (executor.runs, monitor.gave_up) == (1, True)


@pytest.mark.django_db(transaction=True)
def test_a_monitor_that_gave_up_stops_without_asking_the_silent_database_again(make_mailbox):
    executor = SilentExecutor()
    leases = LeaseKeeper(executor, node=NODE, ttl_seconds=0.05)
    assert leases.lease(make_mailbox().pk).acquire()
    monitor = monitor_on(executor, leases)
    stopped: list[bool] = []

    async def scenario() -> None:
        monitor.start()
        await asyncio.wait({monitor._task}, timeout=30)  # a bound against hanging, not a measure
        stopping = asyncio.ensure_future(monitor.stop())
        await asyncio.wait({stopping}, timeout=30)
        stopped.append(stopping.done())

    asyncio.run(scenario())
    assert (monitor.gave_up, stopped, executor.runs) == (True, [True], 1)


@pytest.mark.django_db(transaction=True)
def test_without_leases_the_monitor_waits_out_an_outage_however_long(make_mailbox):
    clock = [0.0]
    executor = OutageExecutor(clock)
    leases = LeaseKeeper(executor, node=NODE, ttl_seconds=0.02, clock=lambda: clock[0])  # short back-off
    monitor = Pop3Monitor(executor, leases, node=NODE, interval=0.001, on_give_up=lambda: None)

    async def scenario() -> None:
        monitor.start()
        while executor.runs < 12:
            await asyncio.sleep(0.001)
        monitor._stopping.set()
        await monitor._task

    asyncio.run(scenario())
    assert clock[0] >= 120.0
    assert monitor.gave_up is False


@pytest.mark.django_db(transaction=True)
def test_a_session_that_outlives_the_lease_ttl_keeps_its_lock(make_mailbox):
    mailbox = make_mailbox("long@example.test")
    deliver([mailbox.address], [b"Subject: a\r\n\r\nkept\r\n"])
    database = BoundedExecutor(2, "test-db")
    monitor = monitor_on(database)
    authenticator = authenticator_on(
        database, BoundedExecutor(1, "test-hash"), leases=monitor.leases, failure_delay=0, penalty_max=0
    )

    def login():
        request = LoginRequest(mailbox.address, PASSWORD, "USER", "192.0.2.10", True, uuid.uuid4().hex)
        return authenticator.authenticate(request)

    def as_if_an_hour_had_passed() -> None:
        MaildropLease.objects.update(
            acquired_at=Now() - timedelta(hours=1), expires_at=Now() + timedelta(seconds=1)
        )

    async def scenario():
        first = await login()
        await database.run(as_if_an_hour_had_passed)
        assert await monitor.tick()
        left = await database.run(lease_seconds_left)
        second = await login()
        await first.maildrop.commit(first.maildrop.messages)
        await first.maildrop.release()
        return left, second.failure

    left, second = asyncio.run(scenario())
    assert left > 50  # renewed for a whole TTL
    assert second is LoginFailure.IN_USE
    assert (Message.objects.count(), MaildropLease.objects.count()) == (0, 0)


class FailingReleaseExecutor(BoundedExecutor):
    async def run(self, function, *args):
        if function is store.release_lease:
            raise InterfaceError("connection already closed")
        return await super().run(function, *args)


@pytest.mark.django_db(transaction=True)
def test_a_lease_whose_release_fails_is_no_longer_renewed(make_mailbox, caplog):
    executor = FailingReleaseExecutor(1, "test-db")
    leases = LeaseKeeper(executor, node=NODE, ttl_seconds=60)
    kept, ended = (leases.lease(make_mailbox(f"{name}@example.test").pk) for name in ("kept", "ended"))
    assert kept.acquire() and ended.acquire()
    assert sorted(leases.owners()) == sorted([kept.owner, ended.owner])
    with caplog.at_level(logging.WARNING, logger="mailadmin.pop3d.leases"):
        asyncio.run(OrmMaildrop(executor, ended, []).release())
    assert leases.owners() == [kept.owner]
    assert caplog.messages == [
        f"could not release lease {ended.owner} (connection already closed); it lapses at its expiry"
    ]


@pytest.mark.django_db(transaction=True)
def test_a_chunk_read_after_the_server_dropped_the_connection_reconnects(make_mailbox, daemon_connections):
    needs_postgresql()
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"Subject: a\r\n\r\nfirst chunk\r\n"])
    message_id = Message.objects.get().pk
    executor = BoundedExecutor(1, "test-db")

    def read() -> bytes | None:
        return asyncio.run(executor.run(store.read_chunk, message_id, 0))

    first = read()  # the pool thread now keeps a connection open
    terminate_other_backends()
    assert read() == first
    assert first.endswith(b"first chunk\r\n")


@pytest.mark.django_db(transaction=True)
def test_a_read_ahead_on_a_dropped_connection_costs_the_client_nothing(
    make_mailbox, daemon_connections, monkeypatch, settings
):
    needs_postgresql()
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # the backends are dropped from the loop's thread
    settings.POP3_READAHEAD_BYTES = 1000  # three of these messages a batch
    mailbox = make_mailbox()
    bodies = [f"Subject: {n}\r\n\r\n{'b' * 250}\r\n".encode() for n in range(6)]
    for body in bodies:
        deliver([mailbox.address], [body])
    executor = BoundedExecutor(1, "test-db")
    maildrop = OrmMaildrop(
        executor, LeaseKeeper(executor, node=NODE, ttl_seconds=60).lease(mailbox.pk), snapshot(mailbox.pk)
    )
    reads: list[tuple[bool, str]] = []
    read_first_chunks = store.read_first_chunks

    def recorded(keys, health_check=True):
        try:
            found = read_first_chunks(keys, health_check)
        except OperationalError:
            reads.append((health_check, "failed"))
            raise
        reads.append((health_check, "read"))
        return found

    monkeypatch.setattr(store, "read_first_chunks", recorded)

    async def retr(number: int) -> bytes:
        return b"".join([chunk async for chunk in maildrop.read(maildrop.messages[number - 1])])

    ours = connections[DEFAULT_DB_ALIAS]

    async def session() -> list[bytes]:
        got = [await retr(1), await retr(2)]  # 2 leaves less than half a batch: 4-6 are asked for...
        terminate_other_backends(ours)  # ...and meet a connection the server dropped
        await asyncio.sleep(0)
        return got + [await retr(n) for n in range(3, 7)]

    got = asyncio.run(session())
    assert [data.endswith(body) for data, body in zip(got, bodies, strict=True)] == [True] * 6
    assert reads == [(True, "read"), (False, "failed"), (True, "read")]  # 4-6 read again, checked


def every_thread_connected(executor: BoundedExecutor) -> None:
    """Make the pool start all its threads and open a connection on each, as a busy server has."""
    barrier = threading.Barrier(executor.threads)

    def connect_and_wait() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        barrier.wait(timeout=30)

    async def fill() -> None:
        await asyncio.gather(*(executor.run(connect_and_wait) for _ in range(executor.threads)))

    asyncio.run(fill())


@pytest.mark.django_db(transaction=True)
def test_a_postgresql_restart_costs_each_client_at_most_one_temporary_error(make_mailbox, daemon_connections):
    needs_postgresql()
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 1024
    addresses = [make_mailbox(f"poll{n}@example.test").address for n in range(4)]
    for address in addresses:
        for n in range(3):
            deliver([address], [f"Subject: {n}\r\n\r\n{'x' * 3000}\r\n".encode()])  # 3 chunks each
    database = BoundedExecutor(settings.POP3_DB_THREADS, "test-db")
    hashing = BoundedExecutor(1, "test-hash")
    authenticator = authenticator_on(database, hashing, failure_delay=0, penalty_max=0)
    errors = dict.fromkeys(addresses, 0)

    async def log_in(address: str) -> OrmMaildrop | None:
        request = LoginRequest(address, PASSWORD, "USER", "192.0.2.10", True, uuid.uuid4().hex)
        result = await authenticator.authenticate(request)
        if result.maildrop is None:
            assert result.failure is LoginFailure.TEMPORARY
            errors[address] += 1
        return result.maildrop

    async def fetch_all(address: str, maildrop: OrmMaildrop) -> bool:
        """RETR every message, then QUIT; an error ends the session, as it would for a client."""
        try:
            for info in maildrop.messages:
                assert sum([len(chunk) async for chunk in maildrop.read(info)]) == info.size
        except MaildropError:
            errors[address] += 1
            return False
        finally:
            await maildrop.release()
        return True

    async def client(address: str, maildrop: OrmMaildrop | None) -> None:
        """Carry on the session open across the restart, then poll again until a fetch succeeds."""
        for _ in range(5):
            if maildrop is not None and await fetch_all(address, maildrop):
                return
            maildrop = await log_in(address)
        pytest.fail(f"{address} never fetched its mail")

    async def log_in_all() -> list[OrmMaildrop | None]:
        return await asyncio.gather(*(log_in(address) for address in addresses))

    async def carry_on(sessions: list[OrmMaildrop | None]) -> None:
        await asyncio.gather(*map(client, addresses, sessions))

    every_thread_connected(database)
    sessions = asyncio.run(log_in_all())
    terminate_other_backends()
    asyncio.run(carry_on(sessions))
    # The promise is at most one each; with connections idle at the restart, it is none (the
    # chunk cursor unchecked, each session open across the restart lost its next read).
    assert errors == dict.fromkeys(addresses, 0)


class FakeLimits:
    """``resource`` as runpop3 sees it: a soft and a hard open-files limit, and what it set."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        self.set.append(limits)
        self.limits = limits


def test_runpop3_raises_the_open_files_limit_to_the_hard_one(monkeypatch, settings):
    limits = FakeLimits(1024, 65536)
    monkeypatch.setattr(runpop3, "resource", limits)
    settings.POP3_DB_THREADS = 8
    assert runpop3.client_descriptor_room() == 65536 - runpop3.RESERVED_DESCRIPTORS - 8
    assert limits.set == [(65536, 65536)]


def test_runpop3_caps_connections_at_what_the_open_files_limit_leaves_room_for(monkeypatch, settings):
    monkeypatch.setattr(runpop3, "resource", FakeLimits(1024, 1024))
    settings.POP3_DB_THREADS, settings.POP3_MAX_CONNECTIONS = 8, 10_000
    stderr = io.StringIO()
    assert runpop3.Command(stderr=stderr)._connection_cap() == 952
    assert stderr.getvalue() == (
        "POP3_MAX_CONNECTIONS is 10000, but the open-files limit leaves room for 952 clients: "
        "serving at most 952 (raise ulimit -n, LimitNOFILE= in systemd)\n"
    )
    settings.POP3_MAX_CONNECTIONS = 500
    assert runpop3.Command(stderr=io.StringIO())._connection_cap() == 500
