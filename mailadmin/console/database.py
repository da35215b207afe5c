"""The console's database work from async code (consumers, the session poller).

A pool of its own rather than ``database_sync_to_async``, whose default funnels every call of
the process through one thread: a page's refresh must not queue behind every other page's.
"""

from mailadmin.executors import BoundedExecutor

CONSOLE_DB_THREADS = 4

console_database = BoundedExecutor(CONSOLE_DB_THREADS, "console-db")
