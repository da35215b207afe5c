"""Shared fixtures: mailboxes made through the store, and a URL for worker processes."""

import fcntl
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone, translation

from mailadmin.hosting import store
from mailadmin.hosting.store import fastsql

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Signed-in clients for the console's pages.
pytest_plugins = ["tests.console_fixtures"]
# How a test says a peer program or service it talks to is missing. With MAILADMIN_REQUIRE_PEERS=1
# (.ci/run, which installs them all) such a skip fails instead: a peer test must not pass unrun.
MISSING_PEER_REASONS = ("is not installed", "no Redis answers", "Postfix has no pgsql")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    wanted = os.environ.get("MAILADMIN_REQUIRE_PEERS") == "1"
    if report.skipped and wanted and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(missing in reason for missing in MISSING_PEER_REASONS):
            report.outcome = "failed"
            report.longrepr = f"MAILADMIN_REQUIRE_PEERS=1, but a peer is missing: {reason}"


@pytest.fixture(autouse=True)
def default_language():
    """Every test ends in the default language: a request the test client makes with
    ``Accept-Language: id`` leaves Indonesian active in the thread, and the next test on this
    worker would read its messages in it."""
    translation.deactivate()
    yield
    translation.deactivate()


@pytest.fixture
def make_mailbox():
    """Create a mailbox (and its domain when missing) through the store; needs a django_db mark."""

    def make(address: str = "alice@example.test", *, quota_bytes: int = 0, **options):
        return store.create_mailbox(
            address, password="correct horse", quota_bytes=quota_bytes, create_domain=True, **options
        )

    return make


def database_url() -> str:
    """A DATABASE_URL naming the database this test runs against, for child processes."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or ""
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    credentials = f"{user}{password}@" if user else ""
    host, port = settings.get("HOST") or "", settings.get("PORT") or 5432
    return f"postgres://{credentials}{host}:{port}/{settings['NAME']}"


def child_environment(**extra: str) -> dict[str, str]:
    """The test's environment for a child process, on the test database.

    Without DJANGO_ALLOW_ASYNC_UNSAFE, which browser tests set for their own thread only
    (tests.browser): a server child must keep Django's check that no ORM call runs on its loop.
    """
    inherited = {name: value for name, value in os.environ.items() if name != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    return {**inherited, "DATABASE_URL": database_url(), "DEBUG": "1", **extra}


# Where ``manage.py deliver`` looks for runlmtp in tests that start none: a loopback port no
# one listens on. Another runlmtp may listen on the default port, serving another database.
NO_RUNLMTP = {"LMTP_BIND": "127.0.0.1", "LMTP_PORT": "1", "LMTP_SOCKET": ""}


def run_manage(*args: str, input: bytes = b"", **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``manage.py`` in a real child process against the test database."""
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "manage.py"), *args],
        input=input,
        capture_output=True,
        env=child_environment(**{**NO_RUNLMTP, **extra_env}),
        cwd=PROJECT_DIR,
        timeout=120,
    )


def open_session_row(mailbox=None, **fields):
    """A POP3 session row as runpop3 writes it for a logged-in client (of ``mailbox``, if given)."""
    from mailadmin.models import Pop3Session

    values = {
        "id": uuid.uuid4(),
        "node": "n:1",
        "peer_host": "192.0.2.1",
        "peer_port": 1,
        "local_host": "h",
        "local_port": 2,
        "started_at": timezone.now(),
    }
    if mailbox is not None:
        values.update(username=mailbox.address, mailbox=mailbox, domain=mailbox.domain)
    return Pop3Session.objects.create(**{**values, **fields})


# Redis for the live-update tests: a database number of their own, so nothing else is touched.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


def redis_url_or_skip() -> str:
    """TEST_REDIS_URL if a Redis server answers there; otherwise the test is skipped, saying why."""
    import redis

    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2, socket_timeout=2).ping()
    except redis.exceptions.RedisError as error:
        pytest.skip(f"no Redis answers at {TEST_REDIS_URL} (set TEST_REDIS_URL): {error}")
    return TEST_REDIS_URL


@pytest.fixture
def redis_layer(settings) -> str:
    """This process's channel layer on Redis (as with REDIS_URL set); the URL, for children."""
    url = redis_url_or_skip()
    settings.REDIS_URL = url
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}
    }
    return url


@pytest.fixture
def commit_durability(monkeypatch) -> list[str]:
    """What each later commit of the default connection waits for, in order: SQLite's
    ``synchronous`` level ("2" FULL: an fsync; "1" NORMAL: none in WAL mode; "flushed": NORMAL,
    and the log flushed once the write turn is handed on), PostgreSQL's ``synchronous_commit``
    ("on", "off"). A delivery stored by one statement of its own (``fastsql.store_lone_copy``,
    outside a transaction) commits as it runs: it is recorded then."""
    levels: list[str] = []
    commit = connection._commit
    store_lone_copy = fastsql.store_lone_copy

    def record_level():
        with connection.cursor() as cursor:
            cursor.execute(
                "SHOW synchronous_commit" if connection.vendor == "postgresql" else "PRAGMA synchronous"
            )
            level = str(cursor.fetchone()[0])
        flushing = getattr(connection, "flush_log_after_commit", False)
        levels.append("flushed" if flushing and level == "1" else level)

    def recording_commit():
        record_level()
        return commit()

    def recording_lone_copy(copy):
        stored = store_lone_copy(copy)
        if stored is not None and not connection.in_atomic_block:
            record_level()
        return stored

    monkeypatch.setattr(connection, "_commit", recording_commit)
    monkeypatch.setattr(fastsql, "store_lone_copy", recording_lone_copy)
    return levels


def write_turn_taken(lock_path: str) -> bool:
    """Whether another open file holds SQLite's write turn (``<database>-writer.lock``) now."""
    with open(lock_path, "ab") as other:
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(other, fcntl.LOCK_UN)
        return False
