"""SQLite's WAL is checkpointed by a thread of each process, never inside a writer's turn."""

import fcntl
import os
import sqlite3
import threading

import pytest
from django.db import connection, transaction

from mailadmin.models import Domain
from mailadmin.sqlite import base as sqlite_backend

SQLITE_DEFAULT_CHECKPOINT_PAGES = 1000


@pytest.fixture
def sqlite_connection():
    if connection.vendor != "sqlite":
        pytest.skip("the checkpointer is SQLite's")
    connection.ensure_connection()
    return connection


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
        with open(self.lock_path, "ab") as other_process:
            try:
                fcntl.flock(other_process, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.turn_free_when_asked.append(False)
            else:
                fcntl.flock(other_process, fcntl.LOCK_UN)
                self.turn_free_when_asked.append(True)


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
