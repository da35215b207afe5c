"""Settings come from the environment, and refuse unsafe or malformed values."""

import fcntl
import json
import os
import stat
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
    assert loaded["hasher"] == "mailadmin.hosting.argon2hasher.Argon2PasswordHasher"
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


def test_postgresql_connections_time_out_and_keep_alive_settable_by_environment(tmp_path):
    url = "postgres://mail@db.internal:5433/mailadmin"
    defaults = load_settings(tmp_path, SECRET_KEY="x" * 60, DATABASE_URL=url)
    assert defaults.returncode == 0, defaults.stderr
    assert json.loads(defaults.stdout)["options"] == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 60,
        "keepalives_interval": 10,
        "keepalives_count": 6,
        "prepare_threshold": 5,
    }
    changed = load_settings(
        tmp_path,
        SECRET_KEY="x" * 60,
        DATABASE_URL=url + "?sslmode=require",
        DATABASE_CONNECT_TIMEOUT="3",
        DATABASE_KEEPALIVES_IDLE="20",
        DATABASE_KEEPALIVES_INTERVAL="5",
        DATABASE_KEEPALIVES_COUNT="2",
        DATABASE_PREPARE_THRESHOLD="off",
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["options"] == {
        "connect_timeout": 3,
        "keepalives": 1,
        "keepalives_idle": 20,
        "keepalives_interval": 5,
        "keepalives_count": 2,
        "prepare_threshold": None,
        "sslmode": "require",
    }


def test_without_debug_or_secret_key_a_fresh_checkout_keeps_an_owner_only_key_in_var(tmp_path):
    var = tmp_path / "var"
    result = load_settings(var)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["debug"] is False
    assert mode(var) == 0o700
    assert mode(var / "secret_key") == 0o600


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


SHOW_SQLITE_FILES = (
    "import django, os, stat; django.setup(); from django.db import connection; "
    "cursor = connection.cursor(); cursor.execute('CREATE TABLE t (x)'); "
    "cursor.execute('INSERT INTO t VALUES (1)'); name = connection.settings_dict['NAME']; "
    "suffixes = ('', '-wal', '-shm', '-writer.lock'); "
    "print(' '.join(oct(stat.S_IMODE(os.stat(name + suffix).st_mode)) for suffix in suffixes))"
)


def test_the_sqlite_database_its_wal_and_shm_files_are_owner_only(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(
        DJANGO_SETTINGS_MODULE="mailadmin.settings", MAILADMIN_VAR_DIR=str(tmp_path / "var"), DEBUG="1"
    )
    result = subprocess.run(
        [sys.executable, "-c", SHOW_SQLITE_FILES], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0o600"] * 4


SHOW_HTTPS = (
    "import json, django; from django.conf import settings; django.setup(); "
    "print(json.dumps({name: getattr(settings, name, None) for name in ("
    "'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', 'SECURE_HSTS_SECONDS', "
    "'SECURE_PROXY_SSL_HEADER')}))"
)


def https_settings(tmp_path, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in {"DEBUG", "DATABASE_URL"}}
    env.update(DJANGO_SETTINGS_MODULE="mailadmin.settings", MAILADMIN_VAR_DIR=str(tmp_path), **environment)
    result = subprocess.run(
        [sys.executable, "-c", SHOW_HTTPS], cwd=PROJECT_DIR, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_without_debug_the_console_is_https_only_by_default(tmp_path):
    assert https_settings(tmp_path) == {
        "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31_536_000,
        "SECURE_PROXY_SSL_HEADER": None,
    }


def test_with_debug_plain_http_works_and_each_https_setting_comes_from_the_environment(tmp_path):
    assert https_settings(tmp_path, DEBUG="1") == {
        "SECURE_SSL_REDIRECT": False,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_PROXY_SSL_HEADER": None,
    }
    assert https_settings(
        tmp_path,
        SECURE_SSL_REDIRECT="0",
        SECURE_HSTS_SECONDS="600",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto: https",
    ) == {
        "SECURE_SSL_REDIRECT": False,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 600,
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
    }


def test_a_proxy_header_without_a_value_is_refused(tmp_path):
    result = load_settings(tmp_path, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")
    assert result.returncode == 1
    assert "SECURE_PROXY_SSL_HEADER must look like 'X-Forwarded-Proto: https'" in result.stderr


def test_deployment_checks_pass_with_production_settings(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in {"DEBUG", "DATABASE_URL"}}
    env.update(PRODUCTION_LIKE, MAILADMIN_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (result.returncode, result.stderr) == (0, "")


# What .ci/run passes to `check --deploy` too.
PRODUCTION_LIKE = {
    "DEBUG": "0",
    "SECRET_KEY": "k" * 20 + "Q7#x" * 10,
    "ALLOWED_HOSTS": "mail.example.net",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
}


def test_a_malformed_number_is_named(tmp_path):
    result = load_settings(tmp_path, DEBUG="1", POP3_PORT="eleven")
    assert result.returncode == 1
    assert "POP3_PORT must be a number (int), got 'eleven'" in result.stderr


@pytest.mark.parametrize("interval", ["0", "-1"])
def test_a_monitor_interval_of_no_time_is_refused(tmp_path, interval):
    """runpop3's monitor ticks on the beat of this interval: 0 would end it, below 0 hang it."""
    result = load_settings(tmp_path, DEBUG="1", POP3_MONITOR_INTERVAL=interval)
    assert result.returncode == 1
    message = f"POP3_MONITOR_INTERVAL must be a number of seconds above 0, got {float(interval)!r}"
    assert message in result.stderr


class FakeClock:
    """Stands in for the ``time`` module of the SQLite backend: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


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
    # Polled every tenth of a millisecond until the 0.3 s timeout (3,000 polls, give or take one
    # for the sum of floats), then given up.
    assert set(clock.sleeps) == {0.0001}
    assert 2999 <= len(clock.sleeps) <= 3001
    with transaction.atomic():  # the lock is free again: the write goes through
        Domain.objects.create(name="after.test")
    assert list(Domain.objects.values_list("name", flat=True)) == ["after.test"]
