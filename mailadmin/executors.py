"""Bounded thread pools that keep ORM work and password hashing off the event loop.

Django's ``a*`` ORM methods funnel through one shared thread and ``aauthenticate`` hashes on
the loop itself (Django ticket #36439), so the POP3 server runs each unit of database work as
one sync function on a pool of its own, with ``close_old_connections()`` around it: a broken
connection (a PostgreSQL restart) is dropped and the next unit reconnects.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections

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


class BoundedExecutor:
    """A fixed number of threads; work beyond them queues instead of running at once."""

    def __init__(self, threads: int, name: str, initializer: Callable[[], object] | None = None) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name, initializer=initializer)

    async def run(self, function: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _database_unit, function, args)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _database_unit(function: Callable[..., T], args: tuple) -> T:
    close_old_connections()
    try:
        return function(*args)
    finally:
        close_old_connections()


def keep_connections_open(max_age_seconds: int) -> None:
    """Let the daemons' fixed worker threads reuse their connections (health-checked).

    Called by runpop3 and runlmtp before any thread connects: without it every unit of work
    would open a new database connection, which on PostgreSQL means a new backend process.
    """
    for database in settings.DATABASES.values():
        database["CONN_MAX_AGE"] = max_age_seconds
        database["CONN_HEALTH_CHECKS"] = True
