"""SQLite's WAL is checkpointed by a thread of each process, outside the writers' turn but for
what they appended meanwhile, so that the log starts again."""

import fcntl
import os
import threading

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from mailadmin import sqlite as sqlite_library
from mailadmin.models import Domain
from mailadmin.sqlite import base as sqlite_backend
from mailadmin.sqlite import dbapi2 as sqlite3
from tests.conftest import write_turn_taken

SQLITE_DEFAULT_CHECKPOINT_PAGES = 1000


@pytest.fixture
def sqlite_connection():
    if connection.vendor != "sqlite":
        pytest.skip("the checkpointer is SQLite's")
    connection.ensure_connection()
    return connection


@pytest.mark.parametrize(
    ("version", "affected"),
    [
        ((3, 6, 23), False),  # before WAL
        ((3, 7, 0), True),
        ((3, 40, 1), True),  # Debian 12's
        ((3, 44, 5), True),
        ((3, 44, 6), False),
        ((3, 45, 0), True),
        ((3, 50, 6), True),
        ((3, 50, 7), False),
        ((3, 51, 2), True),
        ((3, 51, 3), False),
        ((3, 53, 4), False),
    ],
)
def test_the_sqlite_versions_with_the_wal_reset_bug(version, affected):
    assert sqlite_library.has_the_wal_reset_bug(version) is affected


@pytest.mark.django_db(transaction=True)
def test_every_connection_and_checkpoint_uses_one_sqlite_without_the_wal_reset_bug(sqlite_connection):
    """A bench run's database was left corrupt by the WAL-reset race on Debian 12's SQLite."""
    with sqlite_connection.cursor() as cursor:
        cursor.execute("SELECT sqlite_version()")
        (version,) = cursor.fetchone()
    assert tuple(int(part) for part in version.split(".")) == sqlite3.sqlite_version_info
    assert not sqlite_library.has_the_wal_reset_bug(sqlite3.sqlite_version_info)
    assert isinstance(sqlite_connection.connection, sqlite3.Connection)
    assert sqlite_backend.sqlite3 is sqlite3
    assert sqlite_backend.base.Database is sqlite3


@pytest.mark.django_db
@pytest.mark.parametrize(("version", "refused"), [("3.40.1", True), ("3.51.3", False)])
def test_dbshell_refuses_a_sqlite3_shell_with_the_wal_reset_bug(
    sqlite_connection, tmp_path, monkeypatch, version, refused
):
    ran = tmp_path / "ran"
    shell = tmp_path / "sqlite3"
    shell.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version} 2026-03-13 10:00:00 0123abcd"; '
        f'else echo "opened $1" > {ran}; fi\n'
    )
    shell.chmod(0o755)
    monkeypatch.setattr(sqlite_backend.DatabaseClient, "executable_name", str(shell))
    if refused:
        with pytest.raises(CommandError, match=f"uses SQLite {version}, which has the WAL-reset bug"):
            call_command("dbshell")
        assert not ran.exists()
    else:
        call_command("dbshell")
        assert ran.read_text() == f"opened {sqlite_connection.settings_dict['NAME']}\n"


def test_a_sqlite3_shell_that_is_not_there_has_no_version():
    assert sqlite_backend.shell_version("/nonexistent/sqlite3") is None


@pytest.mark.django_db(transaction=True)
def test_sqlites_own_checkpoint_is_left_as_a_backstop_far_above_its_default(sqlite_connection):
    with sqlite_connection.cursor() as cursor:
        cursor.execute("PRAGMA wal_autocheckpoint")
        assert cursor.fetchone() == (sqlite_backend.BACKSTOP_CHECKPOINT_PAGES,)
    assert sqlite_backend.BACKSTOP_CHECKPOINT_PAGES >= 10 * SQLITE_DEFAULT_CHECKPOINT_PAGES


class RecordingCheckpointer:
    """Stands in for a process's checkpointer: notes whether the write turn was free when asked."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        self.turn_free_when_asked: list[bool] = []

    def request(self) -> None:
        self.turn_free_when_asked.append(not write_turn_taken(self.lock_path))


@pytest.mark.django_db(transaction=True)
def test_each_commit_asks_for_a_checkpoint_only_once_the_write_turn_is_given_back(
    sqlite_connection, monkeypatch
):
    recorder = RecordingCheckpointer(f"{sqlite_connection.settings_dict['NAME']}-writer.lock")
    asked_for = []
    monkeypatch.setattr(sqlite_backend, "_checkpointer", lambda path: asked_for.append(path) or recorder)
    with transaction.atomic():
        Domain.objects.create(name="one.test")
    with transaction.atomic():
        Domain.objects.create(name="two.test")
    with pytest.raises(RuntimeError), transaction.atomic():
        Domain.objects.create(name="rolled-back.test")
        raise RuntimeError("no commit, nothing to checkpoint")
    assert recorder.turn_free_when_asked == [True, True]
    assert asked_for == [sqlite_connection.settings_dict["NAME"]] * 2


def test_the_checkpointer_copies_the_log_into_the_database_file(tmp_path):
    path = str(tmp_path / "checkpointed.sqlite3")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute(f"PRAGMA wal_autocheckpoint = {sqlite_backend.BACKSTOP_CHECKPOINT_PAGES}")
    writer.execute("CREATE TABLE probe (n INTEGER)")
    writer.executemany("INSERT INTO probe VALUES (?)", [(n,) for n in range(500)])
    # Only in the log so far: the database file alone (immutable: the log unread) lacks them.
    assert _rows_in_the_database_file(path) is None

    rested = threading.Event()
    checkpointer = sqlite_backend.Checkpointer(path, pause=lambda seconds: rested.set())
    checkpointer.request()
    assert rested.wait(timeout=30)
    assert _rows_in_the_database_file(path) == 500
    writer.close()


class CommitsMeanwhile:
    """The checkpointer's connection, with a writer committing while its first checkpoint runs
    (as runpop3's monitor does beside prunehistory); notes whether each later statement ran
    while the write turn was taken."""

    def __init__(self, connection: sqlite3.Connection, writer: sqlite3.Connection, lock_path: str) -> None:
        self.connection, self.writer, self.lock_path = connection, writer, lock_path
        self.statements = 0
        self.turn_taken: list[bool] = []

    def execute(self, sql: str):
        self.statements += 1
        if self.statements > 1:
            self.turn_taken.append(write_turn_taken(self.lock_path))
            return self.connection.execute(sql)
        # Its transaction began before the checkpoint and commits after it.
        self.writer.execute("BEGIN IMMEDIATE")
        self.writer.execute("INSERT INTO probe VALUES (-1, zeroblob(3000))")
        rows = self.connection.execute(sql).fetchall()
        self.writer.execute("COMMIT")
        return FetchedRows(rows)


class FetchedRows(list):
    def fetchall(self) -> list:
        return self


def one_passive_checkpoint(connection, writer_lock) -> None:
    """What the checkpointer did before: the log never started again under steady writes."""
    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


@pytest.mark.parametrize(
    "checkpoint, log_starts_again", [(sqlite_backend.checkpoint, True), (one_passive_checkpoint, False)]
)
def test_a_long_log_starts_again_though_a_writer_committed_during_the_checkpoint(
    tmp_path, checkpoint, log_starts_again
):
    path = str(tmp_path / "restarted.sqlite3")
    lock_path = sqlite_backend.writer_lock_path(path)
    writer = _writer_of_a_long_log(path)
    checkpointer = CommitsMeanwhile(sqlite3.connect(path, isolation_level=None), writer, lock_path)
    with open(lock_path, "ab") as writer_lock:
        checkpoint(checkpointer, writer_lock)
    writer.execute("INSERT INTO probe VALUES (-2, NULL)")  # the next writer: one page

    frames = _frames_in_the_log(path)
    if not log_starts_again:
        assert frames > sqlite_backend.LOG_RESTART_FRAMES
    else:
        assert frames == 1
        assert checkpointer.turn_taken == [True]  # what came meanwhile: copied in the write turn
        assert not write_turn_taken(lock_path)  # and the turn given back
    writer.close()


def test_the_checkpointer_leaves_the_rest_for_later_when_a_writer_keeps_the_turn(tmp_path, monkeypatch):
    path = str(tmp_path / "busy.sqlite3")
    lock_path = sqlite_backend.writer_lock_path(path)
    writer = _writer_of_a_long_log(path)
    monkeypatch.setattr(sqlite_backend, "CHECKPOINTER_TURN_SECONDS", 0.01)
    checkpointer = CommitsMeanwhile(sqlite3.connect(path, isolation_level=None), writer, lock_path)
    with open(lock_path, "ab") as holder, open(lock_path, "ab") as writer_lock:
        fcntl.flock(holder, fcntl.LOCK_EX)
        sqlite_backend.checkpoint(checkpointer, writer_lock)
        assert checkpointer.statements == 1  # the first checkpoint only; no second without the turn
        assert write_turn_taken(lock_path)  # still the holder's
    writer.close()


def test_the_write_turn_is_left_alone_while_a_reader_holds_back_the_copy(tmp_path):
    """A reader on an older snapshot stops the copy short: the log cannot start again anyway."""
    path = str(tmp_path / "read.sqlite3")
    lock_path = sqlite_backend.writer_lock_path(path)
    writer = _writer_of_a_long_log(path)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    (rows,) = reader.execute("SELECT count(*) FROM probe").fetchone()
    assert rows == sqlite_backend.LOG_RESTART_FRAMES + 100  # its snapshot: the log as it is now
    writer.executemany("INSERT INTO probe VALUES (?, zeroblob(3000))", [(n,) for n in range(100)])
    checkpointer = CommitsMeanwhile(sqlite3.connect(path, isolation_level=None), writer, lock_path)
    with open(lock_path, "ab") as writer_lock:
        sqlite_backend.checkpoint(checkpointer, writer_lock)
    assert checkpointer.statements == 1
    assert checkpointer.turn_taken == []
    reader.execute("COMMIT")
    writer.close()


def _writer_of_a_long_log(path: str) -> sqlite3.Connection:
    """A connection that has written more than LOG_RESTART_FRAMES frames (a page a row) to the log."""
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute(f"PRAGMA wal_autocheckpoint = {sqlite_backend.BACKSTOP_CHECKPOINT_PAGES}")
    writer.execute("CREATE TABLE probe (n INTEGER, padding BLOB)")
    rows = [(n,) for n in range(sqlite_backend.LOG_RESTART_FRAMES + 100)]
    writer.executemany("INSERT INTO probe VALUES (?, zeroblob(3000))", rows)
    return writer


def _frames_in_the_log(path: str) -> int:
    """The frames in the log now (a checkpoint on a connection of its own reports them)."""
    probe = sqlite3.connect(path, isolation_level=None)
    try:
        ((_, frames, _),) = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return frames
    finally:
        probe.close()


def _rows_in_the_database_file(path: str) -> int | None:
    reader = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return reader.execute("SELECT count(*) FROM probe").fetchone()[0]
    except sqlite3.OperationalError:  # no such table: not in the file yet
        return None
    finally:
        reader.close()


def test_a_forked_child_starts_a_checkpointer_of_its_own(tmp_path):
    """runpop3 and runlmtp fork their workers: the parent's thread does not live on in them."""
    path = str(tmp_path / "forked.sqlite3")
    parents = sqlite_backend._checkpointer(path)
    assert sqlite_backend._checkpointer(path) is parents
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child answers through the pipe
        os.write(write_end, b"own" if sqlite_backend._checkpointer(path) is not parents else b"parent's")
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 16) == b"own"
    os.waitpid(child, 0)


@pytest.mark.django_db(transaction=True)
def test_checkpoint_now_copies_only_what_is_committed(sqlite_connection, monkeypatch):
    calls = []
    this_thread = threading.get_ident()

    def checkpoint(raw, lock) -> None:
        if threading.get_ident() == this_thread:  # not the checkpointer thread, which a commit wakes
            calls.append(raw)

    monkeypatch.setattr(sqlite_backend, "checkpoint", checkpoint)
    with transaction.atomic():
        Domain.objects.create(name="copied.test")
        sqlite_connection.checkpoint_now()  # inside a transaction: nothing to copy yet
    assert calls == []
    sqlite_connection.checkpoint_now()
    assert calls == [sqlite_connection.connection]


@pytest.mark.django_db(transaction=True)
def test_a_failed_checkpoint_now_is_logged_and_the_work_goes_on(sqlite_connection, monkeypatch, caplog):
    def failing(raw_connection, writer_lock):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_backend, "checkpoint", failing)
    with caplog.at_level("ERROR", logger="mailadmin.sqlite.base"):
        sqlite_connection.checkpoint_now()
    assert [record.getMessage().split(";")[1] for record in caplog.records] == [" SQLite's own will follow"]
    assert Domain.objects.create(name="still-writable.test").pk
