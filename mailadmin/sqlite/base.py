"""Django's SQLite backend, with write transactions queued on a kernel lock.

SQLite lets one writer in at a time and makes the others poll: its busy handler sleeps 1, 2, 5,
10, 15... ms between tries. Several processes writing the same database (``runlmtp --workers``,
runpop3 beside runlmtp) then lose milliseconds asleep while the lock is long free, and
short transactions pile up behind the sleepers. Here every write transaction first takes an
exclusive ``flock()`` on ``<database>-writer.lock``, tried every tenth of a millisecond, so the
next writer starts within that of the previous commit; ``BEGIN IMMEDIATE`` then finds the database
free. Statements outside a transaction keep SQLite's own busy timeout.

The wait is bounded by the same busy timeout (OPTIONS ``timeout``): a transaction left open
(a forgotten shell session) makes writers fail with "database is locked", as SQLite would,
rather than hang; hence the polling rather than a blocking ``flock()``.

SQLite's own WAL checkpoint runs inside the commit that takes the log past 1,000 pages, while
that writer still holds the write turn: copying those pages into the database file took 85 ms
and more, and every other writer waited (runpop3's monitor beside ``prunehistory``, say). Here a
commit only wakes a checkpointer thread of the process, which runs a passive checkpoint on a
connection of its own, at most every CHECKPOINT_EVERY_SECONDS: no writer waits for it, and
writers go on appending to the log meanwhile. SQLite's own stays as a backstop at
BACKSTOP_CHECKPOINT_PAGES, for a log that no commit of ours follows.

The log starts again from its beginning only when a writer begins after a checkpoint that
copied all of it, with no reader still on the log. Under a steady stream of writes
(``prunehistory``'s batches beside runpop3's monitor) some commit always lands while the
checkpoint runs, so the log never started again, grew to the backstop, and SQLite's checkpoint
then ran inside a commit after all (40-70 ms of the write turn, bench ``console_prune``). So once
the log holds LOG_RESTART_FRAMES, the checkpointer copies what was appended meanwhile inside the
write turn (a transaction's pages or two), and the next writer starts the log again.

With OPTIONS ``pool`` (a number), a closed connection is parked for the next one this process
opens instead of being closed, up to that many: under ASGI every request has a connection of its
own, and opening one (the file, the PRAGMAs, Django's SQL functions) cost a web worker a fifth
of its CPU per API request. Only a connection outside any transaction is parked.
"""

import contextlib
import fcntl
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from django.core.management.base import CommandError
from django.db import OperationalError
from django.db.backends.sqlite3 import base, client

from mailadmin import scheduling
from mailadmin.sqlite import dbapi2 as sqlite3
from mailadmin.sqlite import has_the_wal_reset_bug

logger = logging.getLogger(__name__)

# How often a waiter tries for the write turn. The turn usually comes back within a millisecond
# or two (an LMTP group's statements and commit), and a poll that comes late leaves the database
# idle meanwhile: two LMTP workers delivered 841 messages a second polling every half
# millisecond, 990 every tenth. The same for every waiter: flock() keeps no queue, so a waiter
# that polled less often (the checkpointer's copy, a prune batch) would lose most hand-overs.
POLL_SECONDS = 0.0001
DEFAULT_TIMEOUT_SECONDS = 5.0  # sqlite3.connect's own default
# Often, so that each checkpoint's flush is small: a commit's fsync waits behind it in the
# disk's queue (1 s between checkpoints made prunehistory's commits wait 100 ms and more).
CHECKPOINT_EVERY_SECONDS = 0.1
BACKSTOP_CHECKPOINT_PAGES = 10_000
# A log this long (4 MB of 4 KiB pages) is copied to its end in the write turn, so that it starts again.
LOG_RESTART_FRAMES = 1000
# The checkpointer waits this long for the write turn, then leaves the rest to its next round.
CHECKPOINTER_TURN_SECONDS = 1.0


def _create_private(path: str | os.PathLike) -> None:
    """Create ``path`` empty and owner-only unless it exists (then its mode is the operator's)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


# Parked connections by database file, each with its writer lock's file: (connection, lock).
_parked: dict[str, list[tuple[sqlite3.Connection, BinaryIO]]] = {}
_parked_lock = threading.Lock()


class Checkpointer:
    """One thread per process and database file that checkpoints the log when a commit asks."""

    def __init__(self, path: str, pause: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.pause = pause
        self.wanted = threading.Event()
        thread = threading.Thread(target=self._run, name=f"sqlite-checkpoint {path}", daemon=True)
        thread.start()

    def request(self) -> None:
        self.wanted.set()

    def _run(self) -> None:
        scheduling.run_as_the_process()  # not that of the thread that happened to start it
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        _create_private(writer_lock_path(self.path))
        with open(writer_lock_path(self.path), "ab") as writer_lock:
            while True:
                self.wanted.wait()
                self.wanted.clear()
                try:
                    checkpoint(connection, writer_lock)
                except (sqlite3.Error, OSError):
                    logger.exception("WAL checkpoint of %s failed; SQLite's own will follow", self.path)
                self.pause(CHECKPOINT_EVERY_SECONDS)


def writer_lock_path(database: str) -> str:
    return f"{database}-writer.lock"


def checkpoint(connection: sqlite3.Connection, writer_lock: BinaryIO) -> None:
    """Copy the log into the database file beside the writers; once it is long, copy what they
    appended meanwhile in the write turn, so that the next writer starts the log again.

    PASSIVE: never waits for a writer or a reader (one on an older snapshot stops the copy short:
    then the log cannot start again, and nothing is done in the turn)."""
    ((busy, frames, copied),) = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    if busy or copied < frames or frames < LOG_RESTART_FRAMES:
        return
    # The copy in the turn also fsyncs the database file, this copy's pages with its own (SQLite
    # fsyncs it only after a copy that reached the log's end). Flushing them first, outside the
    # turn, made the writers' own fsyncs wait behind that flush instead: longest write beside
    # prunehistory 177 ms against 55 ms (bench database, 1,099,000 rows).
    if not take_write_turn(writer_lock, CHECKPOINTER_TURN_SECONDS):
        return
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        fcntl.flock(writer_lock, fcntl.LOCK_UN)


# Each database file's log, open for flushing as long as the process runs (see flush_log), and
# the logs whose flush failed.
_logs: dict[str, int] = {}
_failed_flushes: dict[str, OSError] = {}
_logs_lock = threading.Lock()


class LogNotFlushed(OperationalError):
    """A transaction was committed, and other connections may read it, but its log could not be
    flushed: it may not survive a crash. Raised from the commit, so that the caller does not
    report it durable (an MTA is answered with a temporary failure and delivers again)."""

    committed = True


def flush_log(database: str) -> None:
    """Flush ``database``'s write-ahead log to disk (``fdatasync``).

    On a descriptor the process keeps open: the kernel reports a failed write-back once to each
    open file, and one opened afresh after another had been told would never hear of it. Once a
    flush has failed, every later one of the process fails too (as PostgreSQL stops at a failed
    fsync): the pages it lost are not written again, and a later flush that succeeded would
    not make them durable. A log that SQLite removed (its last connection closed) and made anew
    is opened again. The first flush of a log also flushes its directory, where its name was
    written when it was created."""
    with _logs_lock:
        if database in _failed_flushes:
            raise OSError(f"an earlier flush of this log failed ({_failed_flushes[database]}): restart")
        log = _logs.get(database)
        if log is None or os.fstat(log).st_nlink == 0:
            if log is not None:
                os.close(log)
                del _logs[database]
            _logs[database] = _open_log(database)
            log = _logs[database]
        try:
            os.fdatasync(log)
        except OSError as error:
            _failed_flushes[database] = error
            raise


def _open_log(database: str) -> int:
    """The log of ``database`` opened, its directory flushed."""
    log = os.open(f"{database}-wal", os.O_RDONLY | os.O_CLOEXEC)
    try:
        directory = os.open(os.path.dirname(os.path.abspath(database)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        os.close(log)
        raise
    return log


def _forget_the_parents_logs() -> None:
    """A forked child opens its own: an open file's write-back errors are told once, to whichever
    process asks first."""
    global _logs_lock
    _logs_lock = threading.Lock()
    for log in _logs.values():
        os.close(log)
    _logs.clear()


os.register_at_fork(after_in_child=_forget_the_parents_logs)


def take_write_turn(writer_lock: BinaryIO, timeout: float) -> bool:
    """Take the exclusive lock on the writer lock file, tried every POLL_SECONDS; False if it
    stayed taken for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)


# This process's checkpointers by database file.
_checkpointers: dict[str, Checkpointer] = {}
_checkpointers_lock = threading.Lock()


def _checkpointer(path: str) -> Checkpointer:
    with _checkpointers_lock:
        if path not in _checkpointers:
            _checkpointers[path] = Checkpointer(path)
        return _checkpointers[path]


def _forget_the_parents_checkpointers() -> None:
    """A forked child has none of its parent's threads: it starts checkpointers of its own."""
    global _checkpointers_lock
    _checkpointers_lock = threading.Lock()
    _checkpointers.clear()


os.register_at_fork(after_in_child=_forget_the_parents_checkpointers)


class DatabaseClient(client.DatabaseClient):
    """``manage.py dbshell``: the ``sqlite3`` shell, on the system's SQLite library, refused
    when that has the WAL-reset bug (``mailadmin.sqlite``): its writes and checkpoints beside
    the running servers' could meet the race."""

    def runshell(self, parameters):
        version = shell_version(self.executable_name)
        if version is not None and has_the_wal_reset_bug(version):
            shown = ".".join(map(str, version))
            raise CommandError(
                f"{self.executable_name} uses SQLite {shown}, which has the WAL-reset bug "
                "(https://sqlite.org/wal.html#walresetbug): use a sqlite3 shell of 3.51.3 or later"
            )
        super().runshell(parameters)


def shell_version(executable: str) -> tuple[int, ...] | None:
    """The SQLite version ``executable --version`` reports, or None when it is not there."""
    try:
        output = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    first = output.split(maxsplit=1)[0] if output.strip() else ""
    return tuple(int(part) for part in first.split(".")) if first.replace(".", "").isdigit() else None


class DatabaseWrapper(base.DatabaseWrapper):
    client_class = DatabaseClient
    writer_lock: BinaryIO | None = None
    pool_size = 0
    # Set by flushing_after_the_turn(): commit without an fsync, then flush the log outside the turn.
    flush_log_after_commit = False
    _journal_is_wal: tuple[sqlite3.Connection, bool] | None = None
    _lowered_synchronous: sqlite3.Connection | None = None  # inside synchronous_normal()

    def get_connection_params(self):
        params = super().get_connection_params()
        self.pool_size = params.pop("pool", 0)
        return params

    def get_new_connection(self, conn_params):
        if self.pool_size and not self.is_in_memory_db():
            with _parked_lock:
                parked = _parked.get(self.settings_dict["NAME"])
                if parked:
                    connection, self.writer_lock = parked.pop()
                    return connection
        if not self.is_in_memory_db():
            # All mail and password hashes: owner-only. SQLite gives its -wal and -shm files
            # the database file's permissions, so creating the file first covers them too.
            _create_private(self.settings_dict["NAME"])
        connection = super().get_new_connection(conn_params)
        if not self.is_in_memory_db():
            connection.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_CHECKPOINT_PAGES}")
            lock_path = writer_lock_path(self.settings_dict["NAME"])
            _create_private(lock_path)
            self.writer_lock = open(lock_path, "ab")  # noqa: SIM115
        return connection

    def _start_transaction_under_autocommit(self):
        self._lock_writers()
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._unlock_writers()
            raise

    def _commit(self):
        try:
            super()._commit()
        finally:
            self._unlock_writers()
        if self.writer_lock is not None:
            try:
                if self.flush_log_after_commit:
                    self._flush_log()
            finally:  # a checkpoint copies what was committed, flushed or not
                _checkpointer(self.settings_dict["NAME"]).request()

    @contextlib.contextmanager
    def flushing_after_the_turn(self) -> Iterator[None]:
        """Transactions whose commits reach the disk after the write turn is handed on, and are
        as durable when they return as any other commit.

        A commit's fsync inside the turn (``synchronous=FULL``) keeps every other writer of every
        process waiting for the disk. Here SQLite commits without it (``synchronous=NORMAL``),
        the turn goes to the next writer, and the log is flushed (``fdatasync``) before the
        commit returns: the next writer's statements run during this one's flush, and one flush
        covers every commit appended before it. SQLite itself still flushes the log before a
        checkpoint copies it and the database file after, so a log that starts again never
        drops a commit whose own flush is yet to come.

        What differs from a commit at FULL: in the moment between a commit and its flush, other
        connections can already read it, before its caller learns that it is durable.
        A database not in WAL mode keeps its own commits (they need the fsync inside).
        """
        self.ensure_connection()
        if self.flush_log_after_commit or self.writer_lock is None or not self._in_wal_mode():
            yield  # already flushing (an enclosing block), or a commit that keeps its own fsync
            return
        with self.synchronous_normal():
            self.flush_log_after_commit = True
            try:
                yield
            finally:
                self.flush_log_after_commit = False

    @contextlib.contextmanager
    def synchronous_normal(self) -> Iterator[None]:
        """This connection's commits without their fsync (``synchronous=NORMAL``; in WAL mode, no
        fsync at all) for the block, then at its level again. Outside a transaction: SQLite
        refuses to change the level inside one. A connection closed meanwhile is gone, never
        parked at this level (``_park``)."""
        self.ensure_connection()
        raw = self.connection
        with self.wrap_database_errors:
            (level,) = raw.execute("PRAGMA synchronous").fetchone()
            raw.execute("PRAGMA synchronous = NORMAL")
        enclosing, self._lowered_synchronous = self._lowered_synchronous, raw
        try:
            yield
        finally:
            self._lowered_synchronous = enclosing
            if self.connection is raw:
                self._restore_synchronous(level)

    def _restore_synchronous(self, level: int) -> None:
        """Best effort, so as not to hide the block's own error: a connection that cannot be put
        back to its level is closed (the next starts at the level of every connection)."""
        try:
            self.connection.execute(f"PRAGMA synchronous = {int(level)}")
        except sqlite3.Error:
            logger.exception("synchronous level not restored; closing the connection")
            self.close()

    def _in_wal_mode(self) -> bool:
        """Whether the database's journal is the write-ahead log (asked once per connection)."""
        if self._journal_is_wal is None or self._journal_is_wal[0] is not self.connection:
            with self.wrap_database_errors:
                (mode,) = self.connection.execute("PRAGMA journal_mode").fetchone()
            self._journal_is_wal = (self.connection, mode.lower() == "wal")
        return self._journal_is_wal[1]

    def _flush_log(self) -> None:
        try:
            flush_log(self.settings_dict["NAME"])
        except OSError as error:
            logger.error("a transaction was committed but its log could not be flushed: %s", error)
            raise LogNotFlushed(f"the committed transaction's log could not be flushed: {error}") from error

    def _rollback(self):
        try:
            super()._rollback()
        finally:
            self._unlock_writers()

    def _close(self):
        if self._park():
            return
        try:
            super()._close()
        finally:
            if self.writer_lock is not None:
                self.writer_lock.close()  # also releases the lock
                self.writer_lock = None

    def _park(self) -> bool:
        """Keep the open connection for the next one, if pooling and there is room."""
        if (
            not self.pool_size
            or self.writer_lock is None
            or self.connection.in_transaction
            or self._lowered_synchronous is self.connection  # not at the level it started with
        ):
            return False
        with _parked_lock:
            parked = _parked.setdefault(self.settings_dict["NAME"], [])
            if len(parked) >= self.pool_size:
                return False
            parked.append((self.connection, self.writer_lock))
        self.writer_lock = None
        return True

    def checkpoint_now(self) -> None:
        """Copy the log into the database file in this thread, now, as the checkpointer thread
        does (``checkpoint``): for bulk work that should append to the log no faster than the
        disk takes it in (``commits.letting_the_log_catch_up``). When another connection's
        checkpoint is running, nothing: that one copies the log. (Waiting it out, up to
        CHECKPOINTER_TURN_SECONDS, cut a prune to a twentieth of its pace, bench smoke run.)

        Inside a transaction, nothing: SQLite refuses to checkpoint there, and the work is not
        committed yet. A failure is logged, as the checkpointer thread's are: the committed
        work stands, and the next checkpoint copies the log."""
        if self.in_atomic_block or not self.get_autocommit():
            return
        self.ensure_connection()
        if self.writer_lock is None:
            return
        try:
            checkpoint(self.connection, self.writer_lock)
        except (sqlite3.Error, OSError):
            name = self.settings_dict["NAME"]
            logger.exception("WAL checkpoint of %s failed; SQLite's own will follow", name)

    def _lock_writers(self) -> None:
        if self.writer_lock is None:
            return
        timeout = self.settings_dict.get("OPTIONS", {}).get("timeout", DEFAULT_TIMEOUT_SECONDS)
        if not take_write_turn(self.writer_lock, timeout):
            raise OperationalError(f"database is locked: no write turn within {timeout} s")

    def _unlock_writers(self) -> None:
        if self.writer_lock is not None:
            fcntl.flock(self.writer_lock, fcntl.LOCK_UN)
