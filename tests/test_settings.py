"""Settings come from the environment, and refuse unsafe or malformed values."""

import fcntl
import json
import os
import subprocess
import sys

import pytest
from django.db import OperationalError, connection, transaction

from mailadmin.models import Domain
from mailadmin.sqlite import base as sqlite_backend
from tests.conftest import PROJECT_DIR

PRINT_SETTINGS = (
    "import json, django; from django.conf import settings; django.setup(); "
    "db = settings.DATABASES['default']; "
    "print(json.dumps({'engine': db['ENGINE'], 'name': str(db['NAME']), 'options': db.get('OPTIONS', {}), "
    "'layer': settings.CHANNEL_LAYERS['default']['BACKEND'], 'debug': settings.DEBUG, "
    "'hasher': settings.PASSWORD_HASHERS[0], 'pop3_port': settings.POP3_PORT}))"
)


def load_settings(tmp_path, **environment: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DEBUG", "POP3_PORT"}
    }
    env.update(DJANGO_SETTINGS_MODULE="mailadmin.settings", MAILADMIN_VAR_DIR=str(tmp_path), **environment)
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
    )


def test_local_defaults_sqlite_in_var_with_wal_immediate_transactions_and_argon2(tmp_path):
    result = load_settings(tmp_path, DEBUG="1")
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["engine"] == "mailadmin.sqlite"
    assert loaded["name"] == str(tmp_path / "mailadmin.sqlite3")
    assert loaded["options"]["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in loaded["options"]["init_command"]
    assert loaded["options"]["timeout"] == 30
    assert loaded["layer"] == "channels.layers.InMemoryChannelLayer"
    assert loaded["hasher"] == "django.contrib.auth.hashers.Argon2PasswordHasher"
    key = (tmp_path / "secret_key").read_text()
    assert len(key) >= 50
    assert load_settings(tmp_path, DEBUG="1").returncode == 0
    assert (tmp_path / "secret_key").read_text() == key  # generated once, then kept


def test_postgresql_and_redis_come_from_their_urls(tmp_path):
    result = load_settings(
        tmp_path,
        SECRET_KEY="x" * 60,
        DATABASE_URL="postgres://mail@db.internal:5433/mailadmin",
        REDIS_URL="redis://127.0.0.1:6379/0",
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert (loaded["engine"], loaded["name"]) == ("django.db.backends.postgresql", "mailadmin")
    assert loaded["layer"] == "channels_redis.core.RedisChannelLayer"
    assert loaded["debug"] is False


def test_secret_key_is_required_when_debug_is_off(tmp_path):
    result = load_settings(tmp_path)
    assert result.returncode == 1
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr
    assert not (tmp_path / "secret_key").exists()


def test_a_malformed_number_is_named(tmp_path):
    result = load_settings(tmp_path, DEBUG="1", POP3_PORT="eleven")
    assert result.returncode == 1
    assert "POP3_PORT must be a number (int), got 'eleven'" in result.stderr


class FakeClock:
    """Stands in for the ``time`` module of the SQLite backend: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now = len(self.sleeps) * seconds


@pytest.mark.django_db(transaction=True)
def test_a_write_transaction_waits_for_the_writer_lock_only_up_to_the_busy_timeout(monkeypatch):
    """A transaction held open elsewhere fails writers after the timeout; it never hangs them."""
    if connection.vendor != "sqlite":
        pytest.skip("the writer lock is SQLite's")
    connection.ensure_connection()
    monkeypatch.setitem(
        connection.settings_dict, "OPTIONS", {**connection.settings_dict["OPTIONS"], "timeout": 0.3}
    )
    clock = FakeClock()
    with open(f"{connection.settings_dict['NAME']}-writer.lock", "ab") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        monkeypatch.setattr(sqlite_backend, "time", clock)
        with pytest.raises(OperationalError, match="database is locked"):
            with transaction.atomic():
                Domain.objects.create(name="waits.test")
        monkeypatch.undo()
    # Polled every half millisecond until the 0.3 s timeout, then given up.
    assert clock.sleeps == [sqlite_backend.POLL_SECONDS] * 600
    with transaction.atomic():  # the lock is free again: the write goes through
        Domain.objects.create(name="after.test")
    assert list(Domain.objects.values_list("name", flat=True)) == ["after.test"]
