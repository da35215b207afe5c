"""``runweb``: daphne in several processes on one port, supervised together; on PostgreSQL each
worker keeps a bounded pool of connections instead of connecting for every request."""

import http.client
import io
import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.management import call_command
from django.db import connection

from mailadmin import executors, webworkers
from mailadmin.sqlite import dbapi2 as sqlite3
from tests.conftest import run_manage
from tests.daemons import HOST, STARTUP_TIMEOUT, DaemonProcess, free_port, running_daemon, start_daemon

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


class RunWeb(DaemonProcess):
    command = "runweb"


def start_runweb(tmp_path, *arguments: str, **environment: str) -> tuple[RunWeb, int]:
    port = free_port()
    web = start_daemon(
        RunWeb,
        ["--port", str(port), *arguments],
        stderr_path=tmp_path / "runweb.stderr",
        environment=environment,
        ready=["Web listening on"],
    )
    return web, port


def get(port: int, path: str, **headers: str) -> int:
    """The status of ``GET path``, once a worker answers (they start after the port is bound)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        connection_ = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            connection_.request("GET", path, headers=headers)
            return connection_.getresponse().status
        except (ConnectionError, http.client.RemoteDisconnected):
            assert time.monotonic() < deadline, "no web worker answered"
            time.sleep(0.1)
        finally:
            connection_.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_serve_one_port_and_stop_together_on_sigterm(tmp_path):
    web, port = start_runweb(tmp_path, "--workers", "2")
    assert get(port, "/admin/login/") == 200
    workers = web.workers()
    assert len(workers) == 2
    assert [get(port, "/admin/login/") for _ in range(6)] == [200] * 6
    assert web.terminate() == 0
    assert [pid for pid in workers if alive(pid)] == []


def test_runweb_says_it_listens_once_every_worker_serves(tmp_path):
    """It said so as soon as it had started the workers, seconds before they served."""
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, "--workers", "2")[0]) as web:
        assert web.stderr_text().count("Serving the connections runweb hands over") == 2
        assert web.stdout_lines[0] == f"Web listening on 127.0.0.1:{web_port(web)} (2 daphne processes)"


def test_a_worker_that_dies_stops_the_others_and_runweb_fails(tmp_path):
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, "--workers", "2")[0]) as web:
        first, second = web.workers()
        os.kill(first, signal.SIGKILL)
        assert web.process.wait(timeout=30) == 1
    assert not alive(second)
    assert f"web worker {first} ended unexpectedly (exit status -9); stopping the others" in web.stderr_text()


def test_the_workers_count_comes_from_web_workers(tmp_path):
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, WEB_WORKERS="3")[0]) as web:
        assert len(web.workers()) == 3
        assert web.stdout_lines[0].endswith("(3 daphne processes)")


def test_connections_are_shared_out_among_the_workers_in_turn(tmp_path):
    """runweb hands the connections over in turn. When the workers accepted on the shared
    socket themselves, the first to wake took every connection waiting: with both stopped
    while four clients connected, one of them got three or four."""
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, "--workers", "2")[0]) as web:
        port = web_port(web)
        workers = web.workers()
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)
        try:
            clients = [socket.create_connection((HOST, port), timeout=10) for _ in range(4)]
        finally:
            for worker in workers:
                os.kill(worker, signal.SIGCONT)
        try:
            for client in clients:
                client.sendall(b"GET /admin/login/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert client.recv(64).startswith(b"HTTP/1.1 200 ")
            holders = [worker_holding(workers, client) for client in clients]
        finally:
            for client in clients:
                client.close()
        assert sorted(holders.count(worker) for worker in workers) == [2, 2]


def worker_holding(workers: list[int], client: socket.socket) -> int:
    """The worker process whose socket is the other end of ``client`` (from /proc)."""
    client_port = client.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == client_port:  # the server side: remote = client
            inodes.add(fields[9])
    for worker in workers:
        for descriptor in Path(f"/proc/{worker}/fd").iterdir():
            if os.readlink(descriptor) in {f"socket:[{inode}]" for inode in inodes}:
                return worker
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def received(channel: socket.socket) -> int:
    """How many connections are waiting on a worker's end of a channel (each then closed)."""
    channel.setblocking(False)
    count = 0
    while True:
        try:
            _, descriptors, _, _ = socket.recv_fds(channel, 1, 1)
        except BlockingIOError:
            return count
        for descriptor in descriptors:
            os.close(descriptor)
        count += 1


def test_a_worker_that_cannot_take_a_connection_is_passed_over():
    (full, full_end), (gone, gone_end), (free, free_end) = (webworkers.channel_pair() for _ in range(3))
    gone_end.close()
    filled = 0
    with socket.socket() as connection, socket.socket() as listener:
        while True:  # a worker that stopped reading: its channel is full
            try:
                socket.send_fds(full, [b"c"], [connection.fileno()])
            except BlockingIOError:
                break
            filled += 1
        dispatcher = webworkers.Dispatcher(listener, [full, gone, free])
        assert [dispatcher.hand_over(connection) for _ in range(3)] == [True, True, True]
        assert (received(full_end), received(free_end)) == (filled, 3)
        full_end.close()
        free_end.close()
        assert dispatcher.hand_over(connection) is False  # no worker can take it: it waits


def answered(client: socket.socket) -> bool:
    return client.recv(64).startswith(b"HTTP/1.1 200 ")


def test_a_stopped_worker_holds_only_a_few_connections_and_serves_them_once_it_goes_on(tmp_path):
    """The others serve the rest meanwhile; nothing is lost."""
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, "--workers", "2")[0]) as web:
        port = web_port(web)
        stopped, _ = web.workers()
        os.kill(stopped, signal.SIGSTOP)
        clients = []
        try:
            for _ in range(20):
                client = socket.create_connection((HOST, port), timeout=10)
                clients.append(client)
                client.sendall(b"GET /admin/login/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            client_timeout = 2
            held = []
            for client in clients:
                client.settimeout(client_timeout)
                try:
                    assert answered(client)
                except TimeoutError:
                    held.append(client)
                    client_timeout = 0.2  # the others have had their time by now
        finally:
            os.kill(stopped, signal.SIGCONT)
        for client in held:
            client.settimeout(10)
        assert 1 <= len(held) <= 8
        assert [answered(client) for client in held] == [True] * len(held)
        for client in clients:
            client.close()


def test_stopping_runweb_closes_the_port_before_the_workers_stop(tmp_path):
    web, port = start_runweb(tmp_path, "--workers", "2")
    assert get(port, "/admin/login/") == 200
    workers = web.workers()
    for worker in workers:
        os.kill(worker, signal.SIGSTOP)  # slow to stop: the port must not wait for them
    os.kill(web.pid, signal.SIGTERM)
    try:
        refused = False
        for _ in range(100):
            try:
                socket.create_connection((HOST, port), timeout=1).close()
            except ConnectionRefusedError:
                refused = True
                break
            except ConnectionResetError:
                pass  # queued as the port closed: the kernel resets what nobody will accept
            except TimeoutError:
                pass  # not answered within the second on a loaded machine: not a refusal either
            time.sleep(0.05)
        assert refused
    finally:
        for worker in workers:
            os.kill(worker, signal.SIGCONT)
    assert web.process.wait(timeout=30) == 0


def test_a_port_in_use_is_refused_naming_it(tmp_path):
    with running_daemon(tmp_path, lambda attempt: start_runweb(tmp_path, "--workers", "1")[0]) as web:
        port = web_port(web)
        taken = run_manage("runweb", "--port", str(port), "--workers", "1")
        assert taken.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}:" in taken.stderr.decode()


# --- Connections ---------------------------------------------------------------------------------


def test_pool_connections_pools_postgresql_only(monkeypatch):
    databases = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 600,
            "OPTIONS": {"keepalives": 1},
        },
        "local": {"ENGINE": "mailadmin.sqlite", "CONN_MAX_AGE": 0, "OPTIONS": {"timeout": 5}},
        "other": {"ENGINE": "django.db.backends.mysql", "OPTIONS": {}},
    }
    monkeypatch.setattr(executors, "settings", SimpleNamespace(DATABASES=databases))
    executors.pool_connections(4)
    assert databases == {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"keepalives": 1, "pool": {"min_size": 1, "max_size": 4, "timeout": 30}},
        },
        "local": {"ENGINE": "mailadmin.sqlite", "CONN_MAX_AGE": 0, "OPTIONS": {"timeout": 5, "pool": 4}},
        "other": {"ENGINE": "django.db.backends.mysql", "OPTIONS": {}},
    }


def sqlite_wrapper(path, pool: int):
    """A connection of ``mailadmin.sqlite`` to the database file ``path``, parking up to ``pool``."""
    from mailadmin.sqlite.base import DatabaseWrapper

    settings_dict = {
        **connection.settings_dict,
        "NAME": str(path),
        "OPTIONS": {"pool": pool},
        "TIME_ZONE": None,
    }
    return DatabaseWrapper(settings_dict, alias="parking")


def raw_connection(wrapper):
    wrapper.ensure_connection()
    return wrapper.connection


def test_sqlite_connections_are_parked_for_the_next_and_at_most_pool_of_them(tmp_path):
    first, second, third = (sqlite_wrapper(tmp_path / "db.sqlite3", pool=1) for _ in range(3))
    first_raw, second_raw = raw_connection(first), raw_connection(second)
    assert first_raw is not second_raw
    first.close()
    second.close()  # no room: really closed
    reused = raw_connection(third)
    assert reused is first_raw
    with third.cursor() as cursor:  # still set up as a new one is
        cursor.execute("PRAGMA foreign_keys")
        assert cursor.fetchone() == (1,)
    third.close()
    with pytest.raises(sqlite3.ProgrammingError):
        second_raw.execute("SELECT 1")


def test_a_sqlite_connection_in_a_transaction_is_closed_not_parked(tmp_path):
    wrapper, later = (
        sqlite_wrapper(tmp_path / "db.sqlite3", pool=2),
        sqlite_wrapper(tmp_path / "db.sqlite3", pool=2),
    )
    raw = raw_connection(wrapper)
    raw.execute("BEGIN")
    wrapper.close()
    assert raw_connection(later) is not raw
    later.close()


def test_without_a_pool_a_sqlite_connection_is_closed(tmp_path):
    wrapper, later = (
        sqlite_wrapper(tmp_path / "db.sqlite3", pool=0),
        sqlite_wrapper(tmp_path / "db.sqlite3", pool=0),
    )
    raw = raw_connection(wrapper)
    wrapper.close()
    assert raw_connection(later) is not raw
    later.close()


def backends_of_others() -> list[int]:
    """PostgreSQL backends connected to the test database, other than this test's own."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return sorted(pid for (pid,) in cursor.fetchall())


def test_a_worker_keeps_its_postgresql_connections_between_requests(tmp_path):
    """Without the pool each request started a backend and ended it: none was left between
    requests, and twenty requests made twenty backends."""
    if connection.vendor != "postgresql":
        pytest.skip("connection pools are for PostgreSQL; SQLite connects in-process")
    out = io.StringIO()
    call_command("createtoken", "--scope", "read", "--name", "pool", stdout=out)
    bearer = {"Authorization": f"Bearer {out.getvalue().split()[-1]}"}
    start = lambda attempt: start_runweb(tmp_path, "--workers", "1", WEB_THREADS="2")[0]  # noqa: E731
    # A backend another test's process or thread has not yet given up is not the worker's.
    before = set(backends_of_others())
    with running_daemon(tmp_path, start) as web:
        seen: set[int] = set()
        for _ in range(20):
            assert get(web_port(web), "/api/v1/mailboxes/", **bearer) == 200
            seen.update(set(backends_of_others()) - before)
        assert 1 <= len(seen) <= 2
        assert 1 <= len(set(backends_of_others()) - before) <= 2


def web_port(web: RunWeb) -> int:
    return int(web.stdout_lines[0].split(":")[1].split()[0])
