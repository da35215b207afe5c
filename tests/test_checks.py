"""System checks: unreadable or half-configured TLS files."""

from pathlib import Path

import pytest
from django.core import checks as django_checks
from django.core.checks import Error

from mailadmin import checks
from tests.conftest import run_manage


@pytest.fixture
def readable_pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    return str(cert), str(key)


def test_no_tls_files_configured_is_fine(settings):
    settings.POP3_TLS_CERTFILE = settings.POP3_TLS_KEYFILE = ""
    assert checks.tls_files_readable() == []


def test_readable_tls_files_pass(settings, readable_pair):
    settings.POP3_TLS_CERTFILE, settings.POP3_TLS_KEYFILE = readable_pair
    assert checks.tls_files_readable() == []


def test_a_missing_key_file_is_an_error_naming_the_setting_and_path(settings, readable_pair, tmp_path):
    settings.POP3_TLS_CERTFILE = readable_pair[0]
    settings.POP3_TLS_KEYFILE = str(tmp_path / "missing.pem")
    found = checks.tls_files_readable()
    assert [(type(e), e.id) for e in found] == [(Error, "mailadmin.E001")]
    assert (
        found[0].msg
        == f"POP3_TLS_KEYFILE names {str(tmp_path / 'missing.pem')!r}, which is not a readable file."
    )


def test_a_directory_is_not_a_certificate(settings, readable_pair, tmp_path):
    settings.POP3_TLS_CERTFILE, settings.POP3_TLS_KEYFILE = str(tmp_path), readable_pair[1]
    assert [e.id for e in checks.tls_files_readable()] == ["mailadmin.E001"]


def test_one_tls_setting_without_the_other_is_an_error(settings, readable_pair):
    settings.POP3_TLS_CERTFILE, settings.POP3_TLS_KEYFILE = readable_pair[0], ""
    assert [e.id for e in checks.tls_files_readable()] == ["mailadmin.E002"]


def test_the_checks_run_for_deployment_but_not_before_every_command(settings, tmp_path):
    settings.POP3_TLS_CERTFILE = settings.POP3_TLS_KEYFILE = str(tmp_path / "nope.pem")
    assert "mailadmin.E001" not in {message.id for message in django_checks.run_checks()}
    deployment = django_checks.run_checks(include_deployment_checks=True)
    assert "mailadmin.E001" in {message.id for message in deployment}


@pytest.mark.django_db(transaction=True)
def test_deliver_runs_with_tls_files_it_cannot_read_and_runpop3_refuses_to(make_mailbox, tmp_path):
    """The pipe's user must not need the TLS key; runpop3, which needs it, says what is wrong."""
    unreadable = {
        "POP3_TLS_CERTFILE": str(tmp_path / "nope.pem"),
        "POP3_TLS_KEYFILE": str(tmp_path / "nope.pem"),
    }
    make_mailbox("alice@example.test")
    delivered = run_manage("deliver", "alice@example.test", input=b"Subject: hi\n\nbody\n", **unreadable)
    assert (delivered.returncode, delivered.stderr) == (0, b"")
    refused = run_manage("runpop3", "--port", "0", "--tls-port", "0", **unreadable)
    assert refused.returncode == 1
    assert f"POP3_TLS_CERTFILE names {str(tmp_path / 'nope.pem')!r}" in refused.stderr.decode()
