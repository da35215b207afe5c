"""runlmtp's two statements of a plain delivery, run on its event loop (PostgreSQL).

An LMTP delivery to one mailbox asks the database twice: the recipient's look-up at RCPT
(``fastsql.find_recipient``) and the statement that stores the copy (``fastsql.store_lone_copy``).
Through the database threads each costs two thread hand-overs and Django's work around a unit
(closing stale connections, the cursor's wrappers); on psycopg's asynchronous connections the
loop sends the same SQL, built by the same functions, and waits on the socket as it waits on
its clients. Whatever this path cannot answer for certain, it leaves to the threads: a caller
that gets :class:`Unanswered` asks the usual way, which also says why (the database is down, an
address is an alias, a copy was refused).
"""

import psycopg
import psycopg.sql
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg import pq
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from mailadmin.executors import has_input
from mailadmin.hosting.store import fastsql
from mailadmin.models import Mailbox

# How long a statement waits for a connection of the pool before the threads' way is taken: the
# pool is then busy (each connection waits at most a commit) or cannot connect (the database is
# down, which the threads' way answers).
CONNECTION_WAIT_SECONDS = 0.5
APPLICATION_NAME = "mailadmin runlmtp loop"


class Unanswered(Exception):
    """The loop's statement gave no certain answer and stored nothing; ask through the threads."""


async def open_loop_statements(connections_at_most: int) -> "LoopStatements | None":
    """The loop's statements of this process's event loop, opened; None on SQLite, whose
    statements never wait on a socket (and whose lone copy is a group's transaction)."""
    if not fastsql.stores_lone_copies():
        return None
    statements = LoopStatements(connections_at_most)
    await statements.open()
    return statements


class LoopStatements:
    """A small pool of asynchronous connections, opened for one event loop (a runlmtp worker)."""

    def __init__(self, connections_at_most: int) -> None:
        self._pool = AsyncConnectionPool(
            kwargs=connection_parameters(),
            min_size=1,
            max_size=connections_at_most,
            open=False,
            configure=_configure,
            check=_check_quiet,
            timeout=CONNECTION_WAIT_SECONDS,
            name="runlmtp-loop",
        )

    async def open(self, wait: bool = False) -> None:
        """Start connecting: in the background (a database that is down fails no start-up), or
        with ``wait`` until the first connection is made."""
        await self._pool.open(wait=wait)

    async def close(self) -> None:
        await self._pool.close()

    async def find_recipient(self, address: str, size_bytes: int) -> tuple[Mailbox, bool] | None:
        """``fastsql.find_recipient``, on the loop; :class:`Unanswered` on any failure (it only
        reads: asking again through the threads repeats nothing)."""
        lookup = fastsql.recipient_lookup()
        row = await self._fetch_one(lookup.sql, {"address": address, "size": size_bytes}, writes=False)
        if row is None:
            return None
        return fastsql.recipient_of(
            fastsql.mailbox_of_row(lookup, fastsql.converted_row(row, lookup.converted))
        )

    async def store_lone_copy(self, copy: fastsql.LoneCopy) -> fastsql.LoneCopyStored | None:
        """``fastsql.store_lone_copy``, on the loop, committed on its own (autocommit).

        :class:`Unanswered` when the statement surely stored nothing: no connection to send it
        on, or the server answered it with an error (whatever the error: a statement of its
        own that failed committed nothing); the threads' way then stores the copy or finds out
        why not. When the connection broke with the statement sent, the copy may have been
        stored: that error is raised, and the delivery is a temporary failure, as on the
        threads' way, rather than a copy stored twice.
        """
        row = await self._fetch_one(*fastsql.lone_copy_statement(copy), writes=True)
        return None if row is None else fastsql.LoneCopyStored(*row)

    async def _fetch_one(self, sql: str, params: dict, *, writes: bool) -> tuple | None:
        try:
            async with self._pool.connection() as connection:
                return await _fetch_one(connection, sql, params, writes)
        except (PoolTimeout, PoolClosed) as error:
            raise Unanswered() from error


async def _fetch_one(
    connection: psycopg.AsyncConnection, sql: str, params: dict, writes: bool
) -> tuple | None:
    try:
        cursor = await connection.execute(sql, params)
    except psycopg.Error as error:
        # The connection lost, or ended by the server (57P: a shutdown, a terminated backend):
        # a write may have been committed. Any other error the server answered with (a
        # constraint, a value, a timeout, a plan gone stale) committed nothing.
        lost = connection.broken or (error.sqlstate or "").startswith("57P")
        if lost or fastsql.STALE_PLAN in str(error):
            await connection.close()  # the pool makes a new one
        if lost and writes:
            raise
        raise Unanswered() from error
    try:
        return await cursor.fetchone()
    except psycopg.Error as error:  # reading the row, after the statement ran
        if writes:
            raise
        raise Unanswered() from error


async def _check_quiet(connection: psycopg.AsyncConnection) -> None:
    """The pool's check before it hands a connection out, with no round trip: an idle connection
    with something to read has been ended by the server (a restart, a terminated backend). It
    is closed, so that the pool makes a new one rather than take it back."""
    if connection.pgconn.status != pq.ConnStatus.OK or has_input(connection.pgconn.socket):
        await connection.close()
        raise psycopg.OperationalError("the server has ended the connection")


async def _configure(connection: psycopg.AsyncConnection) -> None:
    """What Django sets on a new connection of its own: its time zone, and the role of
    ``OPTIONS["assume_role"]``."""
    db = connections[DEFAULT_DB_ALIAS]
    if db.timezone_name and connection.info.parameter_status("TimeZone") != db.timezone_name:
        await connection.execute(db.ops.set_time_zone_sql(), [db.timezone_name])
    if role := db.settings_dict["OPTIONS"].get("assume_role"):
        await connection.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Literal(role)))


def connection_parameters() -> dict:
    """Django's connection parameters (its adapters included), for an asynchronous connection in
    autocommit, named in ``pg_stat_activity`` unless ``OPTIONS`` names it."""
    parameters = connections[DEFAULT_DB_ALIAS].get_connection_params()
    del parameters["cursor_factory"]  # a synchronous cursor: the asynchronous one binds on the server too
    parameters.setdefault("application_name", APPLICATION_NAME)
    parameters["autocommit"] = True
    return parameters
