"""Django's SQLite backend, with write transactions queued on a kernel lock.

SQLite lets one writer in at a time and makes the others poll: its busy handler sleeps 1, 2, 5,
10, 15... ms between tries. Several processes writing the same database (``runlmtp --workers``,
runpop3 beside runlmtp) then lose milliseconds asleep while the lock is long free, and
short transactions pile up behind the sleepers. Here every write transaction first takes an
exclusive ``flock()`` on ``<database>-writer.lock``, so writers wait in the kernel and the
next one wakes as soon as the previous commits; ``BEGIN IMMEDIATE`` then finds the database
free. Statements outside a transaction keep SQLite's own busy timeout.
"""

import fcntl
from typing import BinaryIO

from django.db.backends.sqlite3 import base


class DatabaseWrapper(base.DatabaseWrapper):
    writer_lock: BinaryIO | None = None

    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        if not self.is_in_memory_db():
            self.writer_lock = open(f"{self.settings_dict['NAME']}-writer.lock", "ab")  # noqa: SIM115
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

    def _rollback(self):
        try:
            super()._rollback()
        finally:
            self._unlock_writers()

    def _close(self):
        try:
            super()._close()
        finally:
            if self.writer_lock is not None:
                self.writer_lock.close()  # also releases the lock
                self.writer_lock = None

    def _lock_writers(self) -> None:
        if self.writer_lock is not None:
            fcntl.flock(self.writer_lock, fcntl.LOCK_EX)

    def _unlock_writers(self) -> None:
        if self.writer_lock is not None:
            fcntl.flock(self.writer_lock, fcntl.LOCK_UN)
