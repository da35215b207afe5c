"""``runlmtp``: the LMTP listener an MTA (Postfix, Exim) delivers into. Wiring only."""

import asyncio
import os
import signal
import socket
import stat
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from mailadmin.executors import BoundedExecutor, keep_connections_open
from mailadmin.hosting.store import open_loop_statements
from mailadmin.mailin.lmtp.heartbeat import LmtpHeartbeat
from mailadmin.mailin.lmtp.protocol import Policy
from mailadmin.mailin.lmtp.server import LmtpConfig, LmtpServer
from mailadmin.pop3d.registry import node_name
from mailadmin.prefork import pinned, run_workers, worker_count_argument
from pop3.server import LISTEN_BACKLOG, listening_socket

SHUTDOWN_GRACE_SECONDS = 30.0
SMTP_PORT = 25


class Command(BaseCommand):
    help = "Accept mail over LMTP (RFC 2033) on TCP or a unix socket until SIGTERM or Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=settings.LMTP_BIND, help="TCP address (LMTP_BIND).")
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--port", type=int, default=settings.LMTP_PORT, help="TCP port (LMTP_PORT).")
        where.add_argument("--socket", default=settings.LMTP_SOCKET, help="Unix socket path instead of TCP.")
        parser.add_argument(
            "--workers",
            type=worker_count_argument,
            default=settings.LMTP_WORKERS,
            help="Processes serving the listener, or 'auto': one per usable CPU (LMTP_WORKERS).",
        )

    def handle(self, *args, bind: str, port: int, socket: str, workers: int, **options):
        socket_path = socket
        if not socket_path and port == SMTP_PORT:
            raise CommandError("LMTP must never listen on port 25 (RFC 2033 section 5)")
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        config = lmtp_config()
        # Python finds its temporary directory on first use by writing and removing a probe
        # file there; done now, before the workers fork, a kill in the middle of a large
        # message cannot leave that probe behind (the spool files themselves have no name).
        tempfile.gettempdir()
        try:
            if socket_path:
                listener, where = _bind_unix(Path(socket_path))
            else:
                listener = listening_socket(bind, port)
                where = "{}:{}".format(*listener.getsockname()[:2])
        except OSError as error:
            raise CommandError(f"cannot listen: {error}") from None
        try:

            def announce() -> None:
                count = f" ({workers} workers)" if workers > 1 else ""
                self.stdout.write(f"runlmtp: LMTP listening on {where}{count}")
                self.stdout.flush()

            def started() -> None:
                announce()
                # Only the workers serve it: once they have closed theirs at SIGTERM, a client
                # is refused rather than left waiting in a backlog nobody accepts from.
                listener.close()

            if workers == 1:
                announce()
                asyncio.run(self._serve(config, listener))
            elif run_workers(
                workers,
                lambda: asyncio.run(self._serve(config, listener)),
                started,
                pin_to_cpus=settings.DAEMON_PIN_WORKERS,
            ):
                raise CommandError("a worker failed")
        finally:
            listener.close()
            if socket_path:
                Path(socket_path).unlink(missing_ok=True)

    async def _serve(self, config: LmtpConfig, listener: socket.socket) -> None:
        keep_connections_open(settings.DAEMON_DB_CONN_MAX_AGE)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        # A pinned worker's loop and database threads share its CPU: see run_as_batch_thread.
        executor = BoundedExecutor(config.db_threads, "lmtp-db", batch_threads=pinned())
        # A thread of its own: its write waits for the write turn like any, and look-ups must not.
        beats = BoundedExecutor(1, "lmtp-heartbeat")
        # PostgreSQL: a plain delivery's two statements go from the loop (as many connections).
        statements = await open_loop_statements(config.db_threads)
        server = LmtpServer(config, executor, statements)
        heartbeat = LmtpHeartbeat(
            beats, server.committer.tally, node=node_name(), interval=settings.LMTP_HEARTBEAT_INTERVAL
        )
        await server.listen(listener)
        heartbeat.start()
        await stop.wait()
        await server.shutdown(SHUTDOWN_GRACE_SECONDS)
        if statements is not None:
            await statements.close()
        await heartbeat.stop()
        beats.shutdown()
        executor.shutdown()


def lmtp_config() -> LmtpConfig:
    """The listener's configuration, from settings: their defaults are the only ones."""
    # SQLite has one writer at a time: a second group would only wait for the first.
    group_writers = 1 if connection.vendor == "sqlite" else settings.LMTP_GROUP_WRITERS
    return LmtpConfig(
        policy=Policy(
            hostname=settings.LMTP_HOSTNAME,
            max_message_bytes=settings.MAILADMIN_MAX_MESSAGE_SIZE_BYTES,
            max_recipients=settings.LMTP_MAX_RECIPIENTS,
            max_data_line_bytes=settings.LMTP_MAX_LINE_BYTES,
        ),
        over_quota_permanent=settings.LMTP_OVER_QUOTA_PERMANENT,
        idle_timeout=settings.LMTP_IDLE_TIMEOUT,
        max_group=settings.LMTP_GROUP_COMMIT_MAX,
        group_writers=group_writers,
        db_threads=settings.LMTP_DB_THREADS or _db_threads(group_writers),
    )


def _db_threads(group_writers: int) -> int:
    """Threads for the database work when LMTP_DB_THREADS leaves it to us.

    SQLite: the one writer and one thread beside it for RCPT look-ups (the heartbeat has a thread
    of its own). More threads only spread the same work over more threads and connections, and
    cost CPU per delivery (docs/benchmarks.md, "Workers pinned to CPUs, two database threads").
    PostgreSQL: the writers and two threads for look-ups.
    """
    return group_writers + (1 if connection.vendor == "sqlite" else 2)


def _bind_unix(path: Path) -> tuple[socket.socket, str]:
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created with the final mode already: no moment where others may connect.
    previous = os.umask(0o777 & ~settings.LMTP_SOCKET_MODE)
    try:
        listener.bind(str(path))
        listener.listen(LISTEN_BACKLOG)
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(previous)
    return listener, str(path)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a server that died; refuse to take over a live one."""
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise CommandError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
    else:
        raise CommandError(f"{path} is in use by a running server")
    finally:
        probe.close()
