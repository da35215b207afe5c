"""Transactions whose commit does not wait for the disk, and where that helps other writers."""

import contextlib
from collections.abc import Iterator

from django.db import connection, transaction


@contextlib.contextmanager
def not_waiting_for_the_disk() -> Iterator[None]:
    """A transaction whose commit is not flushed to disk before it returns (SQLite in WAL mode:
    ``synchronous=NORMAL``, no fsync; PostgreSQL: ``synchronous_commit`` off).

    The commit is still atomic and seen by every other connection at once; a crash of the
    database's host may forget the last ones (up to ~0.6 s on PostgreSQL, the writes since the
    last checkpoint on SQLite), whole. Only for writes whose loss that way is harmless; each
    caller says why. Inside a caller's transaction, that transaction decides.
    """
    if connection.in_atomic_block:
        yield
    elif connection.vendor == "postgresql":
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
            yield
    else:
        with connection.synchronous_normal(), transaction.atomic():
            yield


def leaving_no_flush_to_others() -> contextlib.AbstractContextManager[None]:
    """A transaction of background bulk work (``prunehistory``'s batches) whose commit leaves
    no flush for runpop3's commits to wait out.

    SQLite: a commit's fsync happens inside the write turn that every writer queues for, so the
    batch does not wait for the disk, and the checkpointer flushes it, mostly outside the turn.
    PostgreSQL: writers share no turn but share the WAL, and a commit not waiting for the disk
    leaves its WAL for the next commit that does: runpop3's. So there the batch waits for its
    own. (A whole bench run, ``console_prune``: the writer's longest commit beside the prune went
    from 2.0 s to 555 ms; what is left comes in the minute after a WAL checkpoint begins.)
    The same commits as ``forgotten_only_with_this_host``, for this other reason.
    """
    return forgotten_only_with_this_host()


def forgotten_only_with_this_host() -> contextlib.AbstractContextManager[None]:
    """A transaction whose commit may be forgotten only when the processes that made it stop too.

    SQLite (WAL mode): it does not wait for the disk (``synchronous=NORMAL``); only a crash of
    the operating system or a power cut forgets it, and those end every process using the file.
    PostgreSQL: it waits. Its asynchronous commits are forgotten also when the server alone
    restarts (a crash of one backend, an immediate stop), while the client carries on, never
    knowing to write them again.
    """
    if connection.vendor == "postgresql":
        return transaction.atomic()
    return not_waiting_for_the_disk()


def flushed_outside_the_write_turn() -> contextlib.AbstractContextManager[None]:
    """A transaction as durable as any when it returns, whose commit on SQLite waits for the disk
    only after handing the write turn to the next writer (see
    ``mailadmin.sqlite.base.DatabaseWrapper.flushing_after_the_turn``). For the deliveries,
    which every process's writers queue behind. PostgreSQL has no write turn: a plain
    transaction. Inside a caller's transaction, that transaction decides.
    """
    if connection.vendor == "sqlite" and not connection.in_atomic_block:
        return connection.flushing_after_the_turn()
    return contextlib.nullcontext()


def letting_the_log_catch_up() -> None:
    """After a transaction of background bulk work (a ``prunehistory`` batch), before the next:
    on SQLite, the log copied into the database file in this thread, mostly outside the write
    turn (``mailadmin.sqlite.base.checkpoint``).

    The checkpointer thread copies at most every 0.1 s; a prune's batches, a few hundred pages
    each, fifty a second, can append faster than it copies on a busy disk, and the log then
    grows to SQLite's own checkpoint, which runs inside a commit, holding the write turn. Here
    the batches wait for the disk instead of the writers. PostgreSQL: nothing to do.
    """
    if connection.vendor == "sqlite":
        connection.checkpoint_now()
