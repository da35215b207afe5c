"""Settings come from the environment, and refuse unsafe or malformed values."""

import json
import os
import subprocess
import sys

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
