"""Commands as doors: each change is audited as the command line; createadmin and auditlog."""

import io
import sys
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, DomainAdministrator, Mailbox, Pop3Session
from tests.conftest import open_session_row

pytestmark = pytest.mark.django_db


def run(*args: str, stdin: str = "") -> str:
    out = io.StringIO()
    previous, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        call_command(*args, stdout=out)
    finally:
        sys.stdin = previous
    return out.getvalue()


def fails(*args: str, stdin: str = "") -> str:
    with pytest.raises(CommandError) as raised:
        run(*args, stdin=stdin)
    return str(raised.value)


@pytest.fixture(autouse=True)
def os_user(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "operator")


def entries() -> list[tuple]:
    return list(
        AuditEntry.objects.order_by("id").values_list(
            "actor_kind", "actor_name", "action", "object_type", "object_name", "domain_name"
        )
    )


def test_every_provisioning_command_is_audited_as_the_command_line(tmp_path, make_mailbox):
    run("createdomain", "example.test", "--quota", "1G")
    run("createmailbox", "a@example.test", "--password-stdin", stdin="a good long password\n")
    run("setpassword", "a@example.test", "--password-stdin", stdin="another good password\n")
    run("setquota", "a@example.test", "5M")
    csv = tmp_path / "rows.csv"
    csv.write_text("address,password,password_hash,quota\nb@example.test,a good long password,,\n")
    run("importmailboxes", str(csv))
    mailbox = make_mailbox("c@example.test")
    open_session_row(mailbox)
    run("kickpop3", "c@example.test")
    run("deletemailbox", "a@example.test", "--no-input")
    cli = ("cli", "cli:operator")
    assert [entry[2:] for entry in entries()] == [
        ("create", "domain", "example.test", "example.test"),
        ("create", "mailbox", "a@example.test", "example.test"),
        ("set password", "mailbox", "a@example.test", "example.test"),
        ("update", "mailbox", "a@example.test", "example.test"),
        ("create", "mailbox", "b@example.test", "example.test"),
        ("kick", "pop3 session", f"c@example.test {Pop3Session.objects.get().pk}", "example.test"),
        ("delete", "mailbox", "a@example.test", "example.test"),
    ]
    assert {entry[:2] for entry in entries()} == {cli}
    assert AuditEntry.objects.get(action="set password").changes == {"password": "changed"}
    assert "good" not in str(AuditEntry.objects.values_list("changes", flat=True))


def test_recalcquota_audits_each_corrected_object(make_mailbox):
    make_mailbox("a@example.test")
    Mailbox.objects.update(used_messages=3)
    assert run("recalcquota") == "a@example.test used_messages: recorded 3, actual 0 (corrected)\n"
    assert entries() == [
        ("cli", "cli:operator", "recalculate quota", "mailbox", "a@example.test", "example.test")
    ]
    assert AuditEntry.objects.get().changes == {"used_messages": [3, 0]}


# --- createadmin -----------------------------------------------------------------------------


def test_createadmin_creates_then_updates_a_domain_administrator(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    run("createdomain", "a.test")
    run("createdomain", "b.test")
    assert (
        run(
            "createadmin",
            "olivia",
            "--domain",
            "B.test",
            "--domain",
            "a.test",
            "--password-stdin",
            stdin="a long admin passphrase\n",
        )
        == "created administrator olivia of a.test, b.test\n"
    )
    assert run(
        "createadmin", "olivia", "--domain", "a.test", "--password-stdin", stdin="a new admin passphrase\n"
    ) == ("updated administrator olivia of a.test\n")
    user = get_user_model().objects.get(username="olivia")
    assert (user.is_staff, user.check_password("a new admin passphrase")) == (True, True)
    assert list(DomainAdministrator.objects.values_list("domain__name", flat=True)) == ["a.test"]
    assert entries()[-2:] == [
        ("cli", "cli:operator", "create", "administrator", "olivia", ""),
        ("cli", "cli:operator", "update", "administrator", "olivia", ""),
    ]


def test_createadmin_refusals_are_one_line_errors(make_mailbox):
    make_mailbox("a@example.test")
    assert fails("createadmin", "olivia", "--domain", "example.test") == (
        "pass --password-stdin and give the password on stdin "
        "(a password on the command line would show in ps and shell history)"
    )
    assert fails(
        "createadmin",
        "olivia",
        "--domain",
        "ghost.test",
        "--password-stdin",
        stdin="a long admin passphrase\n",
    ) == ("no such domain: ghost.test")
    assert fails(
        "createadmin",
        "a@example.test",
        "--domain",
        "example.test",
        "--password-stdin",
        stdin="a long admin passphrase\n",
    ) == ("a@example.test is a mailbox's login; an administrator needs a login of its own")
    assert "the following arguments are required: --domain" in fails(
        "createadmin", "olivia", "--password-stdin"
    )
    assert not DomainAdministrator.objects.exists()


# --- auditlog --------------------------------------------------------------------------------


def test_auditlog_prints_one_line_per_entry_oldest_first_filtered_by_domain_and_time():
    run("createdomain", "a.test")
    run("createdomain", "b.test")
    run("createdomain", "c.test")
    old = AuditEntry.objects.get(object_name="a.test")
    old.created_at = timezone.now() - timedelta(days=3)
    old.save(update_fields=["created_at"])
    b_entry = AuditEntry.objects.get(object_name="b.test")
    when = timezone.localtime(b_entry.created_at).isoformat(timespec="seconds")
    lines = run("auditlog").splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(" cli:operator: create domain a.test [a.test]" + lines[1].split("[b.test]")[1])
    assert lines[1] == (
        f"{when} cli:operator: create domain b.test [b.test]"
        " quota_bytes=None->0 max_mailboxes=None->0 default_mailbox_quota_bytes=None->0"
    )
    assert run("auditlog", "--domain", "B.TEST").splitlines() == [lines[1]]
    since = (timezone.localdate() - timedelta(days=1)).isoformat()
    assert run("auditlog", "--since", since).splitlines() == lines[1:]
    assert run("auditlog", "--since", old.created_at.isoformat()).splitlines() == lines


def test_auditlog_keeps_a_deleted_domains_entries():
    run("createdomain", "gone.test")
    services.delete_domain(Actor.cli(), "gone.test")
    assert [
        line.split(": ", 1)[1].split(" [")[0]
        for line in run("auditlog", "--domain", "gone.test").splitlines()
    ] == [
        "create domain gone.test",
        "delete domain gone.test",
    ]


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        (
            "--since",
            "yesterday",
            "invalid date 'yesterday': use YYYY-MM-DD or an ISO time such as 2026-01-31T08:00:00+00:00",
        ),
        ("--since", "2026-13-01", "invalid date '2026-13-01'"),
        (
            "--domain",
            "not a domain",
            "Error: argument --domain: 'not a domain' is not a fully qualified domain name",
        ),
    ],
)
def test_auditlog_explains_a_bad_option(option, value, error):
    assert error in fails("auditlog", option, value)
