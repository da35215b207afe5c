"""SQLite deliveries commit without an fsync inside the write turn, and flush the log after it."""

import errno
import os

import pytest
from django.db import OperationalError, connection, transaction

from mailadmin.hosting import commits
from mailadmin.hosting.figures import DeliveryTally
from mailadmin.mailin.delivery import Delivery, DeliveryStatus, deliver, deliver_group, look_up_recipient
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import DeliveryFigures, Domain, Message
from mailadmin.sqlite import base as sqlite_backend
from tests.conftest import write_turn_taken

pytestmark = pytest.mark.django_db(transaction=True)

SYNCHRONOUS_NORMAL, SYNCHRONOUS_FULL = 1, 2


@pytest.fixture
def flush_state(monkeypatch):
    """flush_log's per-process state (the open logs, the failed flushes) fresh for one test."""
    monkeypatch.setattr(sqlite_backend, "_logs", {})
    monkeypatch.setattr(sqlite_backend, "_failed_flushes", {})
    yield
    for log in sqlite_backend._logs.values():
        os.close(log)


@pytest.fixture
def flushes(monkeypatch, flush_state):
    """Each fdatasync of this process from now on: (the file's path, whether the write turn was
    free at that moment)."""
    if connection.vendor != "sqlite":
        pytest.skip("the write turn and its log are SQLite's")
    connection.ensure_connection()
    name = connection.settings_dict["NAME"]
    seen: list[tuple[str, bool]] = []
    fdatasync = os.fdatasync

    def recording(fd: int) -> None:
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), _turn_is_free(name)))
        fdatasync(fd)

    monkeypatch.setattr(sqlite_backend.os, "fdatasync", recording)
    return seen


def _turn_is_free(database: str) -> bool:
    return not write_turn_taken(sqlite_backend.writer_lock_path(database))


def _synchronous() -> int:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA synchronous")
        return cursor.fetchone()[0]


def _log_path() -> str:
    return os.path.realpath(connection.settings_dict["NAME"]) + "-wal"


def test_a_commit_flushes_the_log_once_the_write_turn_is_handed_on(flushes):
    with commits.flushed_outside_the_write_turn():
        with transaction.atomic():
            Domain.objects.create(name="flushed.test")
            inside = _synchronous()
            assert flushes == []
    assert inside == SYNCHRONOUS_NORMAL  # no fsync inside the turn
    assert flushes == [(_log_path(), True)]
    assert _synchronous() == SYNCHRONOUS_FULL  # every other transaction as it was


def test_a_rolled_back_transaction_flushes_nothing_and_the_level_comes_back(flushes):
    with pytest.raises(ZeroDivisionError):
        with commits.flushed_outside_the_write_turn():
            with transaction.atomic():
                Domain.objects.create(name="undone.test")
                raise ZeroDivisionError
    assert flushes == []
    assert _synchronous() == SYNCHRONOUS_FULL
    assert not Domain.objects.filter(name="undone.test").exists()


def test_a_database_not_in_wal_mode_keeps_the_fsync_in_its_commit(flushes, monkeypatch):
    monkeypatch.setattr(sqlite_backend.DatabaseWrapper, "_in_wal_mode", lambda self: False)
    with commits.flushed_outside_the_write_turn():
        with transaction.atomic():
            Domain.objects.create(name="journal.test")
            assert _synchronous() == SYNCHRONOUS_FULL
    assert flushes == []


def test_a_delivery_group_is_flushed_after_its_turn(flushes, make_mailbox):
    make_mailbox("alice@example.test")
    recipient = look_up_recipient("alice@example.test")
    with spool_message([b"Subject: hello\n\nbody\n"]) as message:
        (results,) = deliver_group([Delivery([recipient], message, "sender@example.test")])
    assert [result.status for result in results] == [DeliveryStatus.DELIVERED]
    assert flushes == [(_log_path(), True)]
    assert Message.objects.filter(mailbox__user__username="alice@example.test").count() == 1


def _failing_flush(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_a_log_that_cannot_be_flushed_fails_the_commit_that_others_may_already_read(flushes, monkeypatch):
    """Unlike a commit at FULL, which SQLite would not publish: the caller must not call it
    durable (the MTA is told to try again), and knows it was committed."""
    monkeypatch.setattr(sqlite_backend.os, "fdatasync", _failing_flush)
    with pytest.raises(
        sqlite_backend.LogNotFlushed, match="could not be flushed: .*Input/output error"
    ) as raised:
        with commits.flushed_outside_the_write_turn():
            with transaction.atomic():
                Domain.objects.create(name="unflushed.test")
    assert isinstance(raised.value, OperationalError) and raised.value.committed
    assert Domain.objects.filter(name="unflushed.test").exists()
    assert _synchronous() == SYNCHRONOUS_FULL
    assert _turn_is_free(connection.settings_dict["NAME"])


def test_a_group_whose_log_was_not_flushed_fails_and_its_written_figures_are_not_counted_again(
    flushes, monkeypatch, make_mailbox
):
    make_mailbox("alice@example.test")
    recipient = look_up_recipient("alice@example.test")
    tally = DeliveryTally()
    tally.add("example.test", "no_such_mailbox")  # a refusal counted before the group
    monkeypatch.setattr(sqlite_backend.os, "fdatasync", _failing_flush)
    with spool_message([b"Subject: hello\n\nbody\n"]) as message, pytest.raises(sqlite_backend.LogNotFlushed):
        deliver_group([Delivery([recipient], message, "sender@example.test")], tally)
    assert len(tally) == 0  # written with the group: not put back to be written twice
    figures = DeliveryFigures.objects.filter(domain__name="example.test")
    assert sorted(figures.values_list("outcome", "messages")) == [("delivered", 1), ("no_such_mailbox", 1)]


def test_a_nested_block_leaves_the_enclosing_one_flushing(flushes):
    with commits.flushed_outside_the_write_turn():
        with connection.flushing_after_the_turn():
            pass
        assert (_synchronous(), connection.flush_log_after_commit) == (SYNCHRONOUS_NORMAL, True)
        with transaction.atomic():
            Domain.objects.create(name="nested.test")
    assert flushes == [(_log_path(), True)]
    assert _synchronous() == SYNCHRONOUS_FULL


@pytest.mark.parametrize("block", [commits.flushed_outside_the_write_turn, commits.not_waiting_for_the_disk])
def test_a_connection_closed_inside_the_block_is_not_parked_at_its_lowered_level(flushes, monkeypatch, block):
    monkeypatch.setattr(connection, "pool_size", 1)  # as a web worker's connections are pooled
    name = connection.settings_dict["NAME"]
    parked_before = len(sqlite_backend._parked.get(name, []))
    with block():
        connection.close()
    assert len(sqlite_backend._parked.get(name, [])) == parked_before
    assert _synchronous() == SYNCHRONOUS_FULL  # a new connection, as every one starts


def test_inside_a_callers_transaction_the_caller_decides(flushes):
    with transaction.atomic():
        with commits.flushed_outside_the_write_turn():
            Domain.objects.create(name="outer.test")
            assert _synchronous() == SYNCHRONOUS_FULL
    assert flushes == []


def test_a_pipe_delivery_all_or_none_commits_at_full_so_that_a_failure_stores_nothing(flushes, make_mailbox):
    make_mailbox("alice@example.test")
    (result,) = deliver(["alice@example.test"], [b"Subject: piped\n\nbody\n"], all_or_none=True)
    assert result.status is DeliveryStatus.DELIVERED
    assert flushes == []  # SQLite's own fsync, inside the commit


@pytest.fixture
def log_file(tmp_path, flush_state):
    """A database path whose log exists."""
    (tmp_path / "db.sqlite3-wal").write_bytes(b"frames")
    return str(tmp_path / "db.sqlite3")


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_log_stays_open_between_flushes_and_is_opened_again_once_sqlite_made_it_anew(log_file):
    sqlite_backend.flush_log(log_file)
    log = sqlite_backend._logs[log_file]
    sqlite_backend.flush_log(log_file)
    assert sqlite_backend._logs[log_file] == log  # the same open file
    os.unlink(f"{log_file}-wal")  # the last connection closed; a new one makes the log anew
    with open(f"{log_file}-wal", "wb") as anew:
        anew.write(b"new frames")
    sqlite_backend.flush_log(log_file)
    assert os.fstat(sqlite_backend._logs[log_file]).st_ino == os.stat(f"{log_file}-wal").st_ino


def test_after_a_failed_flush_every_later_one_fails_until_a_restart(log_file, monkeypatch):
    with monkeypatch.context() as failing:
        failing.setattr(sqlite_backend.os, "fdatasync", _failing_flush)
        with pytest.raises(OSError, match="Input/output error"):
            sqlite_backend.flush_log(log_file)
    # The disk answers again: the pages it lost are still lost.
    with pytest.raises(
        OSError, match=r"an earlier flush of this log failed \(.*Input/output error\): restart"
    ):
        sqlite_backend.flush_log(log_file)


def test_a_directory_that_cannot_be_flushed_leaves_no_descriptor_open(log_file, monkeypatch):
    before = _open_descriptors()
    monkeypatch.setattr(sqlite_backend.os, "fsync", _failing_flush)
    with pytest.raises(OSError, match="Input/output error"):
        sqlite_backend.flush_log(log_file)
    assert (_open_descriptors(), sqlite_backend._logs) == (before, {})


def test_a_forked_child_opens_the_log_for_itself(log_file):
    sqlite_backend.flush_log(log_file)
    child = os.fork()
    if child == 0:
        os._exit(0 if sqlite_backend._logs == {} else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
