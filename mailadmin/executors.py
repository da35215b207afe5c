"""Bounded thread pools that keep ORM work and password hashing off the event loop.

Django's ``a*`` ORM methods funnel through one shared thread and ``aauthenticate`` hashes on
the loop itself (Django ticket #36439), so the POP3 server runs each unit of database work as
one sync function on a pool of its own, with ``close_old_connections()`` around it: a broken
connection (a PostgreSQL restart) is dropped and the next unit reconnects.
"""

import asyncio
import select
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connections
from psycopg import pq

from mailadmin import scheduling

T = TypeVar("T")

# The database errors a later attempt can cure: the server restarting or unreachable, a
# connection found closed (Django raises InterfaceError for that, and it is not a
# DatabaseError), a lock or busy timeout. The daemons answer these as temporary failures and
# log one line. Every other DatabaseError (IntegrityError, ProgrammingError, DataError) is a
# bug or a broken schema, which no retry cures: it is logged with its traceback.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
# Any failure of the database at all: what mail delivery answers with a temporary failure,
# since a message is never bounced for a fault of ours (the MTA retries once it is mended).
DATABASE_ERRORS = (DatabaseError, InterfaceError)
# How long a web request waits for a pooled connection before it fails (psycopg_pool.PoolTimeout).
POOL_WAIT_SECONDS = 30


class BoundedExecutor:
    """A fixed number of threads; work beyond them queues instead of running at once."""

    def __init__(
        self,
        threads: int,
        name: str,
        initializer: Callable[[], object] | None = None,
        *,
        batch_threads: bool = False,
    ) -> None:
        """``batch_threads``: threads that never take the CPU from the loop when they wake
        (:func:`mailadmin.scheduling.run_as_batch_thread`)."""
        self.threads = threads
        start = _as_batch_thread(initializer) if batch_threads else initializer
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name, initializer=start)

    async def run(self, function: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _database_unit, function, args)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _as_batch_thread(initializer: Callable[[], object] | None) -> Callable[[], None]:
    def start() -> None:
        scheduling.run_as_batch_thread()
        if initializer is not None:
            initializer()

    return start


def _database_unit(function: Callable[..., T], args: tuple) -> T:
    close_old_connections()
    _skip_health_checks_of_quiet_connections()
    try:
        return function(*args)
    finally:
        close_old_connections()


def _skip_health_checks_of_quiet_connections() -> None:
    """Spare a PostgreSQL connection Django's health check when its socket already says it is fine.

    With health checks on, Django sends ``SELECT 1`` before the first statement of every unit:
    a round trip each time, two of the dozen an LMTP delivery makes. A connection the server
    has ended (a restart, a terminated backend) has something to read: the server's last
    message, or the end of the stream. So a connection in good standing with nothing to read
    is taken as it is, and any other still gets Django's check, which reconnects if it fails.
    """
    for db in connections.all(initialized_only=True):
        if db.vendor != "postgresql" or db.connection is None:
            continue
        if not db.health_check_enabled or db.health_check_done or db.connection.closed:
            continue
        if db.connection.pgconn.status == pq.ConnStatus.OK and not has_input(db.connection.pgconn.socket):
            db.health_check_done = True


def has_input(fd: int) -> bool:
    """Whether ``fd`` has input (or its end) waiting; poll, as a daemon's descriptors may pass 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def keep_connections_open(max_age_seconds: int) -> None:
    """Let the daemons' fixed worker threads reuse their connections (health-checked).

    Called by runpop3 and runlmtp before any thread connects: without it every unit of work
    would open a new database connection, which on PostgreSQL means a new backend process.
    """
    for database in settings.DATABASES.values():
        database["CONN_MAX_AGE"] = max_age_seconds
        database["CONN_HEALTH_CHECKS"] = True


def pool_connections(max_size: int) -> None:
    """Reuse at most ``max_size`` database connections among a web process's requests.

    Under ASGI Django gives every request a context, and a connection, of its own, and closes
    it when the request ends: without a pool each API call or page would start a PostgreSQL
    backend process and pay its authentication, or open the SQLite file and set it up again.
    PostgreSQL gets Django's pool (psycopg_pool); SQLite, the parking of ``mailadmin.sqlite``.
    Called by the web workers before any request connects.
    """
    for database in settings.DATABASES.values():
        if database["ENGINE"] == "django.db.backends.postgresql":
            database["CONN_MAX_AGE"] = 0  # Django refuses a pool beside persistent connections
            pool = {"min_size": 1, "max_size": max_size, "timeout": POOL_WAIT_SECONDS}
        elif database["ENGINE"] == "mailadmin.sqlite":
            pool = max_size
        else:
            continue
        database.setdefault("OPTIONS", {})["pool"] = pool
