"""The project's SQLite backend (``base``), on a SQLite library without the WAL-reset bug.

Python's own sqlite3 module uses the system's libsqlite3: 3.40.1 on Debian 12, which has the
WAL-reset bug of SQLite 3.7.0 to 3.51.2 (fixed in 3.51.3, and in 3.50.7 and 3.44.6;
https://sqlite.org/wal.html#walresetbug): a commit that starts the log again while another
connection's checkpoint is starting can leave the database corrupt. This backend checkpoints
often, from a thread of every process, and has the log start again on purpose
(``base.checkpoint``): a whole bench run met the race ("database disk image is malformed").

pysqlite3's wheels carry a SQLite of their own (3.53). It stands in for ``sqlite3`` before
Django's backend imports that, so Django's connections, the adapters and converters it
registers, and the checkpointers all use the one library: two copies of SQLite in one process
would each release the other's locks on the same file when closing it.
"""

import sys

import pysqlite3
from django.core.exceptions import ImproperlyConfigured
from pysqlite3 import dbapi2

FIXED_IN = {(3, 44): (3, 44, 6), (3, 50): (3, 50, 7)}  # the fix's backports
FIXED_FROM = (3, 51, 3)


def has_the_wal_reset_bug(version: tuple[int, ...]) -> bool:
    if version >= FIXED_FROM or version < (3, 7, 0):
        return False
    backport = FIXED_IN.get(version[:2])
    return backport is None or version < backport


if any(name.startswith("django.db.backends.sqlite3") for name in sys.modules):
    raise ImproperlyConfigured("Django's SQLite backend was imported before mailadmin.sqlite chose a library")
if has_the_wal_reset_bug(dbapi2.sqlite_version_info):
    raise ImproperlyConfigured(
        f"pysqlite3 uses SQLite {dbapi2.sqlite_version}, which has the WAL-reset bug: "
        "install pysqlite3 from its wheel (pip install --only-binary pysqlite3 -r requirements.txt)"
    )
sys.modules["sqlite3"] = pysqlite3
sys.modules["sqlite3.dbapi2"] = dbapi2
