"""Provisioning commands: createdomain, createmailbox, setpassword, setquota, deletemailbox,
listmailboxes, importmailboxes and recalcquota, success and failure paths."""

import io
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password
from django.core.management import call_command
from django.core.management.base import CommandError

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.mailin.delivery import deliver
from mailadmin.models import Domain, Mailbox, Message
from tests.conftest import run_manage

MiB = 1024**2
CSV_HEADER = "address,password,password_hash,quota\n"
# Few iterations so the test stays fast; Django verifies with the count stored in the hash.
CHEAP_PBKDF2_HASH = PBKDF2PasswordHasher().encode("from pbkdf2", "saltsaltsalt", iterations=1000)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def fails(*args: str) -> str:
    with pytest.raises(CommandError) as raised:
        run(*args)
    return str(raised.value)


def feed_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


class TerminalInput(io.StringIO):
    def isatty(self) -> bool:
        return True


def user(address: str):
    return get_user_model().objects.get(username=address)


def csv_file(tmp_path: Path, *rows: str) -> str:
    path = tmp_path / "mailboxes.csv"
    path.write_text(CSV_HEADER + "".join(f"{row}\n" for row in rows))
    return str(path)


# --- createdomain ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_createdomain_stores_sizes_in_bytes():
    output = run(
        "createdomain",
        "Example.TEST",
        "--quota",
        "2G",
        "--max-mailboxes",
        "3",
        "--default-mailbox-quota",
        "512K",
    )
    domain = Domain.objects.get()
    assert (domain.name, domain.quota_bytes, domain.max_mailboxes, domain.default_mailbox_quota_bytes) == (
        "example.test",
        2 * 1024**3,
        3,
        512 * 1024,
    )
    assert output == (
        "created domain example.test (quota 2.0 GiB, max mailboxes 3, default mailbox quota 512.0 KiB)\n"
    )


@pytest.mark.django_db
def test_createdomain_defaults_to_unlimited():
    assert run("createdomain", "example.test") == (
        "created domain example.test "
        "(quota unlimited, max mailboxes unlimited, default mailbox quota unlimited)\n"
    )
    assert Domain.objects.values_list(
        "quota_bytes", "max_mailboxes", "default_mailbox_quota_bytes"
    ).get() == (0, 0, 0)


@pytest.mark.django_db
@pytest.mark.parametrize("bad", ["12Q", "-1", "1.5M", ""])
@pytest.mark.parametrize("option", ["--quota", "--default-mailbox-quota"])
def test_createdomain_refuses_a_bad_size(option, bad):
    message = fails("createdomain", "example.test", option, bad)
    assert message == (
        f"Error: argument {option}: invalid size {bad!r}: use a number of bytes or a number with K, M, G or T"
    )
    assert not Domain.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("bad", ["-1", "many", "2.5"])
def test_createdomain_refuses_a_bad_mailbox_count(bad):
    assert fails("createdomain", "example.test", "--max-mailboxes", bad) == (
        f"Error: argument --max-mailboxes: invalid number {bad!r}: use a whole number, 0 or more"
    )
    assert not Domain.objects.exists()


@pytest.mark.django_db
def test_createdomain_refuses_a_duplicate_and_an_invalid_name():
    run("createdomain", "example.test")
    assert fails("createdomain", "EXAMPLE.test") == "domain example.test already exists"
    assert fails("createdomain", "localhost") == "'localhost' is not a fully qualified domain name"
    assert list(Domain.objects.values_list("name", flat=True)) == ["example.test"]


@pytest.mark.django_db
def test_createdomain_names_a_leading_dash_value_instead_of_asking_for_a_name():
    assert fails("createdomain", "-bad.test") == (
        "Error: '-bad.test' is not an option; put values that start with '-' after --, "
        "as in: createdomain -- -bad.test"
    )
    assert fails("createdomain", "--", "-bad.test") == "'-bad.test' has an invalid label '-bad'"
    assert not Domain.objects.exists()


@pytest.mark.django_db
def test_createdomain_accepts_terabytes():
    run("createdomain", "example.test", "--quota", "5T")
    assert Domain.objects.get().quota_bytes == 5 * 1024**4


@pytest.mark.django_db(transaction=True)
def test_a_bad_flag_gets_one_line_of_error_and_one_of_usage_hint():
    quota = run_manage("createdomain", "x.test", "--quota", "-5")
    assert (quota.returncode, quota.stdout, quota.stderr.decode()) == (
        2,
        b"",
        "manage.py createdomain: error: argument --quota: invalid size '-5': "
        "use a number of bytes or a number with K, M, G or T\n"
        "Run 'manage.py createdomain --help' for usage.\n",
    )
    dash = run_manage("createdomain", "-bad.test")
    assert (dash.returncode, dash.stderr.decode()) == (
        2,
        "manage.py createdomain: error: '-bad.test' is not an option; put values that start with '-' "
        "after --, as in: manage.py createdomain -- -bad.test\n"
        "Run 'manage.py createdomain --help' for usage.\n",
    )
    assert not Domain.objects.exists()


# --- createmailbox ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_createmailbox_prints_a_generated_password_that_works():
    run("createdomain", "example.test", "--default-mailbox-quota", "10M")
    first_line, password_line = run("createmailbox", "Alice@Example.test").splitlines()
    assert first_line == "created mailbox alice@example.test (quota 10.0 MiB)"
    assert password_line.startswith("password: ")
    password = password_line.removeprefix("password: ")
    assert len(password) >= 24
    assert user("alice@example.test").check_password(password)
    mailbox = Mailbox.objects.get()
    assert (mailbox.quota_bytes, mailbox.quota_messages, mailbox.domain.name) == (10 * MiB, 0, "example.test")


@pytest.mark.django_db
def test_createmailbox_reads_the_password_from_stdin_and_strips_only_the_newline(monkeypatch):
    run("createdomain", "example.test")
    feed_stdin(monkeypatch, "  two words \t\n")
    output = run(
        "createmailbox", "bob@example.test", "--password-stdin", "--quota", "5M", "--quota-messages", "100"
    )
    assert output == "created mailbox bob@example.test (quota 5.0 MiB)\n"
    assert "password" not in output
    bob = user("bob@example.test")
    assert bob.check_password("  two words \t")
    assert not bob.check_password("two words")
    assert (bob.mailbox.quota_bytes, bob.mailbox.quota_messages) == (5 * MiB, 100)


@pytest.mark.django_db
@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_createmailbox_refuses_an_empty_password(monkeypatch, stdin):
    run("createdomain", "example.test")
    feed_stdin(monkeypatch, stdin)
    assert fails("createmailbox", "bob@example.test", "--password-stdin") == "empty password on stdin"
    assert not get_user_model().objects.exists()


@pytest.mark.django_db
def test_createmailbox_quota_zero_overrides_the_domain_default(monkeypatch):
    run("createdomain", "example.test", "--default-mailbox-quota", "1G")
    feed_stdin(monkeypatch, "horse-battery-9\n")
    assert run("createmailbox", "big@example.test", "--quota", "0", "--password-stdin") == (
        "created mailbox big@example.test (quota unlimited)\n"
    )
    assert Mailbox.objects.get().quota_bytes == 0


@pytest.mark.django_db
def test_createmailbox_needs_the_domain_unless_asked_to_create_it(monkeypatch):
    feed_stdin(monkeypatch, "horse-battery-9\n")
    assert fails("createmailbox", "bob@new.test", "--password-stdin") == (
        "no such domain: new.test (create it first, or pass --create-domain)"
    )
    assert not Domain.objects.exists()
    assert not get_user_model().objects.exists()
    feed_stdin(monkeypatch, "horse-battery-9\n")
    run("createmailbox", "bob@new.test", "--password-stdin", "--create-domain")
    assert Mailbox.objects.get().domain.name == "new.test"
    assert user("bob@new.test").check_password("horse-battery-9")


@pytest.mark.django_db
def test_createmailbox_respects_max_mailboxes(monkeypatch):
    run("createdomain", "small.test", "--max-mailboxes", "1")
    feed_stdin(monkeypatch, "first-pass-11\n")
    run("createmailbox", "one@small.test", "--password-stdin")
    feed_stdin(monkeypatch, "second-pass-22\n")
    assert fails("createmailbox", "two@small.test", "--password-stdin") == (
        "domain small.test already has its maximum of 1 mailboxes"
    )
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["one@small.test"]
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_createmailbox_refuses_duplicates_bad_addresses_and_bad_sizes(make_mailbox):
    make_mailbox("alice@example.test")
    assert fails("createmailbox", "ALICE@example.test") == "mailbox alice@example.test already exists"
    assert fails("createmailbox", "no-at-sign") == "'no-at-sign' is not an address of the form local@domain"
    assert fails("createmailbox", "bob@example.test", "--quota", "1.5M") == (
        "Error: argument --quota: invalid size '1.5M': use a number of bytes or a number with K, M, G or T"
    )
    assert fails("createmailbox", "bob@example.test", "--quota-messages", "-1") == (
        "Error: argument --quota-messages: invalid number '-1': use a whole number, 0 or more"
    )
    assert get_user_model().objects.count() == 1


# --- setpassword and setquota ----------------------------------------------------------------


@pytest.mark.django_db
def test_setpassword_reads_stdin(make_mailbox, monkeypatch):
    make_mailbox("alice@example.test")
    feed_stdin(monkeypatch, "new password\r\n")
    assert (
        run("setpassword", "Alice@example.test", "--password-stdin")
        == "password changed for alice@example.test\n"
    )
    alice = user("alice@example.test")
    assert alice.check_password("new password")
    assert not alice.check_password("correct horse")


@pytest.mark.django_db
def test_setpassword_refuses_without_the_stdin_flag_or_with_an_empty_password(make_mailbox, monkeypatch):
    make_mailbox("alice@example.test")
    assert fails("setpassword", "alice@example.test") == (
        "pass --password-stdin and give the password on stdin "
        "(a password on the command line would show in ps and shell history)"
    )
    feed_stdin(monkeypatch, "\n")
    assert fails("setpassword", "alice@example.test", "--password-stdin") == "empty password on stdin"
    assert user("alice@example.test").check_password("correct horse")


@pytest.mark.django_db
@pytest.mark.parametrize("stdin", ["first line\nsecond line\n", "one\n\n", "a long\rpassword\n"])
def test_password_stdin_of_more_than_one_line_is_refused(make_mailbox, monkeypatch, stdin):
    make_mailbox("alice@example.test")
    feed_stdin(monkeypatch, stdin)
    assert fails("setpassword", "alice@example.test", "--password-stdin") == (
        "stdin holds more than one line: give the password alone, on one line"
    )
    feed_stdin(monkeypatch, stdin)
    assert fails("createmailbox", "bob@example.test", "--password-stdin") == (
        "stdin holds more than one line: give the password alone, on one line"
    )
    assert user("alice@example.test").check_password("correct horse")
    assert not Mailbox.objects.filter(user__username="bob@example.test").exists()


@pytest.mark.django_db
def test_setpassword_names_an_unknown_mailbox(monkeypatch):
    feed_stdin(monkeypatch, "whatever\n")
    assert (
        fails("setpassword", "ghost@example.test", "--password-stdin")
        == "no such mailbox: ghost@example.test"
    )


@pytest.mark.django_db
def test_setquota(make_mailbox):
    make_mailbox("alice@example.test", quota_bytes=MiB)
    assert run("setquota", "alice@example.test", "2G") == "quota of alice@example.test set to 2.0 GiB\n"
    assert Mailbox.objects.get().quota_bytes == 2 * 1024**3
    assert run("setquota", "alice@example.test", "0") == "quota of alice@example.test set to unlimited\n"
    assert Mailbox.objects.get().quota_bytes == 0


@pytest.mark.django_db
def test_setquota_below_current_use_warns_and_still_sets_it(make_mailbox):
    alice = make_mailbox("alice@example.test", quota_bytes=MiB)
    deliver([alice.address], [b"x" * 3000])
    used = Mailbox.objects.get().used_bytes
    out, err = io.StringIO(), io.StringIO()
    call_command("setquota", "alice@example.test", "1K", stdout=out, stderr=err)
    assert out.getvalue() == "quota of alice@example.test set to 1.0 KiB\n"
    assert err.getvalue() == (
        f"warning: alice@example.test already uses {used / 1024:.1f} KiB, more than its quota: "
        "it receives no mail until its usage is below the quota\n"
    )
    assert Mailbox.objects.get().quota_bytes == 1024


@pytest.mark.django_db
def test_setquota_takes_t_as_its_help_says(make_mailbox):
    from mailadmin.management.commands.setquota import Command

    make_mailbox("alice@example.test")
    assert run("setquota", "alice@example.test", "5T") == "quota of alice@example.test set to 5.0 TiB\n"
    help_text = " ".join(Command().create_parser("manage.py", "setquota").format_help().split())
    assert "New quota: bytes or a number with K, M, G or T; 0 = unlimited." in help_text


@pytest.mark.django_db
@pytest.mark.parametrize("bad", ["12Q", "-1", "1.5M", "1IB"])
def test_setquota_refuses_a_bad_size(make_mailbox, bad):
    make_mailbox("alice@example.test", quota_bytes=MiB)
    assert fails("setquota", "alice@example.test", bad) == (
        f"Error: argument SIZE: invalid size {bad!r}: use a number of bytes or a number with K, M, G or T"
    )
    assert Mailbox.objects.get().quota_bytes == MiB


@pytest.mark.django_db
def test_setquota_names_an_unknown_mailbox():
    assert fails("setquota", "ghost@example.test", "1M") == "no such mailbox: ghost@example.test"


# --- deletemailbox ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_deletemailbox_without_input_removes_mailbox_login_and_mail(make_mailbox):
    alice = make_mailbox("alice@example.test")
    bob = make_mailbox("bob@example.test")
    deliver([alice.address, bob.address], [b"Subject: hi\n\nhello\n"])
    deliver([alice.address], [b"again\n"])
    assert run("deletemailbox", "alice@example.test", "--no-input") == (
        "deleted mailbox alice@example.test and 2 messages\n"
    )
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["bob@example.test"]
    assert not get_user_model().objects.filter(username="alice@example.test").exists()
    assert Message.objects.get().mailbox_id == bob.pk
    assert Domain.objects.get().used_bytes == Message.objects.get().size_bytes


@pytest.mark.django_db
def test_deletemailbox_asks_on_a_terminal(make_mailbox, monkeypatch):
    alice = make_mailbox("alice@example.test")
    deliver([alice.address], [b"hello\n"])
    monkeypatch.setattr(sys, "stdin", TerminalInput("y\n"))
    assert run("deletemailbox", "alice@example.test") == (
        "Delete mailbox alice@example.test and its 1 messages? [y/N] "
        "deleted mailbox alice@example.test and 1 messages\n"
    )
    assert not Mailbox.objects.exists()
    assert not Message.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("answer", ["y\n", "Y\n", "yes\n", "YES\n", " Yes \n"])
def test_deletemailbox_takes_y_or_yes_in_any_case(make_mailbox, monkeypatch, answer):
    make_mailbox("alice@example.test")
    monkeypatch.setattr(sys, "stdin", TerminalInput(answer))
    output = run("deletemailbox", "alice@example.test")
    assert output.endswith("[y/N] deleted mailbox alice@example.test and 0 messages\n")
    assert not Mailbox.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("answer", ["\n", "n\n", "yes please\n"])
def test_deletemailbox_aborts_unless_the_answer_is_y(make_mailbox, monkeypatch, answer):
    make_mailbox("alice@example.test")
    monkeypatch.setattr(sys, "stdin", TerminalInput(answer))
    assert fails("deletemailbox", "alice@example.test") == "aborted: nothing deleted"
    assert Mailbox.objects.filter(user__username="alice@example.test").exists()


@pytest.mark.django_db
def test_deletemailbox_refuses_to_guess_when_stdin_is_not_a_terminal(make_mailbox, monkeypatch):
    make_mailbox("alice@example.test")
    feed_stdin(monkeypatch, "y\n")
    assert fails("deletemailbox", "alice@example.test") == (
        "stdin is not a terminal, so nobody can confirm: pass --no-input to delete"
    )
    assert Mailbox.objects.exists()


@pytest.mark.django_db
def test_deletemailbox_names_an_unknown_mailbox():
    assert fails("deletemailbox", "ghost@example.test", "--no-input") == "no such mailbox: ghost@example.test"


# --- listmailboxes ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_listmailboxes_prints_an_aligned_table(make_mailbox):
    make_mailbox("alice@a.test", quota_bytes=MiB)
    make_mailbox("bob@b.test")
    make_mailbox("carol@a.test", quota_bytes=1000)
    services.update_mailbox(Actor.cli(), "bob@b.test", active=False)
    Mailbox.objects.filter(user__username="alice@a.test").update(used_bytes=440 * 1024, used_messages=12)
    Mailbox.objects.filter(user__username="carol@a.test").update(used_bytes=999, used_messages=1)
    assert run("listmailboxes") == (
        "address       active  messages       used      quota  percent\n"
        "alice@a.test  yes           12  440.0 KiB    1.0 MiB      42%\n"
        "carol@a.test  yes            1      999 B     1000 B      99%\n"
        "bob@b.test    no             0        0 B  unlimited        -\n"
        "3 mailboxes\n"
    )


@pytest.mark.django_db
def test_listmailboxes_filters_by_domain(make_mailbox):
    make_mailbox("alice@a.test")
    make_mailbox("bob@b.test")
    assert run("listmailboxes", "--domain", "B.test") == (
        "address     active  messages  used      quota  percent\n"
        "bob@b.test  yes            0   0 B  unlimited        -\n"
        "1 mailbox\n"
    )
    run("createdomain", "empty.test")
    assert run("listmailboxes", "--domain", "empty.test").splitlines()[-1] == "0 mailboxes"


@pytest.mark.django_db
def test_listmailboxes_names_an_unknown_domain():
    assert fails("listmailboxes", "--domain", "nowhere.test") == "no such domain: nowhere.test"


# --- importmailboxes -------------------------------------------------------------------------


@pytest.mark.django_db
def test_importmailboxes_creates_every_row_with_working_passwords(tmp_path):
    run("createdomain", "example.test", "--default-mailbox-quota", "20M")
    argon2_hash = make_password("from argon2")
    assert argon2_hash.startswith("argon2$")
    path = csv_file(
        tmp_path,
        "Alice@Example.test,plain secret,,1G",
        f"bob@example.test,,{CHEAP_PBKDF2_HASH},",
        f'carol@example.test,,"{argon2_hash}",0',  # argon2 hashes hold commas: quoted
    )
    assert run("importmailboxes", path) == (
        "created alice@example.test (quota 1.0 GiB)\n"
        "created bob@example.test (quota 20.0 MiB)\n"
        "created carol@example.test (quota unlimited)\n"
        "imported 3 mailboxes\n"
    )
    assert user("alice@example.test").check_password("plain secret")
    assert user("bob@example.test").check_password("from pbkdf2")
    assert user("carol@example.test").check_password("from argon2")
    assert not user("carol@example.test").check_password("from pbkdf2")
    assert dict(Mailbox.objects.values_list("user__username", "quota_bytes")) == {
        "alice@example.test": 1024**3,
        "bob@example.test": 20 * MiB,
        "carol@example.test": 0,
    }


@pytest.mark.django_db
def test_importmailboxes_dry_run_checks_everything_and_writes_nothing(tmp_path):
    run("createdomain", "example.test")
    path = csv_file(
        tmp_path, f"alice@example.test,,{CHEAP_PBKDF2_HASH},5M", f"bob@example.test,,{CHEAP_PBKDF2_HASH},"
    )
    assert run("importmailboxes", path, "--dry-run") == (
        "would create alice@example.test (quota 5.0 MiB)\n"
        "would create bob@example.test (quota unlimited)\n"
        "dry run: 2 mailboxes would be created; nothing was written\n"
    )
    assert not Mailbox.objects.exists()
    assert not get_user_model().objects.exists()


@pytest.mark.django_db
def test_importmailboxes_dry_run_reports_database_errors(tmp_path, make_mailbox):
    make_mailbox("taken@example.test")
    path = csv_file(
        tmp_path, f"new@example.test,,{CHEAP_PBKDF2_HASH},", f"taken@example.test,,{CHEAP_PBKDF2_HASH},"
    )
    assert fails("importmailboxes", path, "--dry-run") == "line 3: mailbox taken@example.test already exists"
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["taken@example.test"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("third_row", "error"),
    [
        ("carol@nowhere.test,,{hash},", "no such domain: nowhere.test"),
        ("carol@example.test,pw,{hash},", "give exactly one of password and password_hash"),
        ("carol@example.test,,,", "give exactly one of password and password_hash"),
        ("carol@example.test,,not-a-hash,", "password hash is not in a format the configured hashers accept"),
        (
            "carol@example.test,,pbkdf2_sha256$2000000000$salt$aGFzaA==,",
            "password hash has iterations 2000000000: pbkdf2_sha256 hashes here need 1 to 10000000 "
            "(at most 10 times the current cost)",
        ),
        (
            "carol@example.test,,pbkdf2_sha256$-1$salt$aGFzaA==,",
            "password hash has iterations -1: pbkdf2_sha256 hashes here need 1 to 10000000 "
            "(at most 10 times the current cost)",
        ),
        (
            "carol@example.test,pass\x1bword-long,,",
            "password rejected: it contains the control character U+001B, which no POP3 client can send",
        ),
        (
            "carol@example.test,,{hash},12Q",
            "invalid size '12Q': use a number of bytes or a number with K, M, G or T",
        ),
        (
            "carol@example.test,,{hash},1.5M",
            "invalid size '1.5M': use a number of bytes or a number with K, M, G or T",
        ),
        (
            "carol@example.test,,{hash},-1",
            "invalid size '-1': use a number of bytes or a number with K, M, G or T",
        ),
        ("carol@example.test,,{hash}", "expected 4 fields, found 3"),
        ("carol,,{hash},", "'carol' is not an address of the form local@domain"),
        ("ALICE@example.test,,{hash},", "alice@example.test is already on line 2"),
        ("taken@example.test,,{hash},", "mailbox taken@example.test already exists"),
        ('"carol@example.test,,{hash},', "unexpected end of data"),
    ],
)
def test_importmailboxes_error_on_line_3_creates_nothing(tmp_path, make_mailbox, third_row, error):
    make_mailbox("taken@example.test")
    path = csv_file(
        tmp_path,
        f"alice@example.test,,{CHEAP_PBKDF2_HASH},",
        third_row.format(hash=CHEAP_PBKDF2_HASH),
        f"dave@example.test,,{CHEAP_PBKDF2_HASH},",
    )
    assert fails("importmailboxes", path) == f"line 3: {error}"
    assert list(Mailbox.objects.values_list("user__username", flat=True)) == ["taken@example.test"]
    assert get_user_model().objects.count() == 1


@pytest.mark.django_db
def test_importmailboxes_refuses_a_hash_whose_hasher_is_missing_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcrypt", None)
    run("createdomain", "example.test")
    bcrypt_hash = "bcrypt_sha256$$2b$12$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy"
    path = csv_file(
        tmp_path, f"alice@example.test,,{CHEAP_PBKDF2_HASH},", f"bob@example.test,,{bcrypt_hash},"
    )
    assert fails("importmailboxes", path) == (
        "line 3: password hash is bcrypt_sha256, which cannot be checked here: "
        "the bcrypt module is not installed"
    )
    assert not Mailbox.objects.exists()


class TerminalOutput(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.django_db
def test_importmailboxes_shows_progress_only_on_a_terminal(tmp_path, monkeypatch):
    run("createdomain", "example.test")
    rows = [f"user{n}@example.test,,{CHEAP_PBKDF2_HASH}," for n in range(3)]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    run("importmailboxes", csv_file(tmp_path, *rows))
    assert sys.stderr.getvalue() == ""
    Mailbox.objects.all().delete()
    get_user_model().objects.all().delete()
    monkeypatch.setattr(sys, "stderr", TerminalOutput())
    run("importmailboxes", csv_file(tmp_path, *rows))
    assert "hashing passwords" in sys.stderr.getvalue()
    assert "3/3" in sys.stderr.getvalue()


@pytest.mark.django_db
def test_importmailboxes_respects_max_mailboxes_and_creates_nothing(tmp_path):
    run("createdomain", "small.test", "--max-mailboxes", "2")
    rows = [f"user{n}@small.test,,{CHEAP_PBKDF2_HASH}," for n in range(3)]
    assert fails("importmailboxes", csv_file(tmp_path, *rows)) == (
        "line 4: domain small.test already has its maximum of 2 mailboxes"
    )
    assert not Mailbox.objects.exists()


@pytest.mark.django_db
def test_importmailboxes_skips_blank_lines_and_counts_them(tmp_path):
    run("createdomain", "example.test")
    path = csv_file(tmp_path, "", f"alice@example.test,,{CHEAP_PBKDF2_HASH},", "", "bob,,,")
    assert fails("importmailboxes", path) == "line 5: 'bob' is not an address of the form local@domain"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "content", ["", "address,password,quota\n", "address,password,password_hash,quota,extra\n"]
)
def test_importmailboxes_requires_the_exact_header(tmp_path, content):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert fails("importmailboxes", str(path)) == (
        "line 1: the header must be exactly address,password,password_hash,quota"
    )


@pytest.mark.django_db
def test_importmailboxes_reports_an_unreadable_file(tmp_path):
    missing = tmp_path / "missing.csv"
    assert fails("importmailboxes", str(missing)) == f"cannot read {missing}: No such file or directory"
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(CSV_HEADER.encode() + "josé@example.test,pw,,\n".encode("latin-1"))
    assert fails("importmailboxes", str(latin1)) == f"{latin1} is not UTF-8 text"


# --- recalcquota -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_recalcquota_reports_and_corrects_drift(make_mailbox):
    alice = make_mailbox("alice@example.test")
    deliver([alice.address], [b"x" * 80])
    size = Message.objects.get().size_bytes
    Mailbox.objects.filter(pk=alice.pk).update(used_bytes=7)
    Domain.objects.update(used_bytes=size + 5)
    assert run("recalcquota") == (
        f"alice@example.test used_bytes: recorded 7, actual {size} (corrected)\n"
        f"example.test used_bytes: recorded {size + 5}, actual {size} (corrected)\n"
    )
    alice.refresh_from_db()
    assert (alice.used_bytes, alice.used_messages) == (size, 1)
    assert Domain.objects.get().used_bytes == size
    assert run("recalcquota", "alice@example.test") == "no drift\n"


@pytest.mark.django_db
def test_recalcquota_names_an_unknown_mailbox():
    assert fails("recalcquota", "ghost@example.test") == "no such mailbox: ghost@example.test"


# --- a real process --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_commands_in_a_real_process_exit_1_with_a_one_line_error():
    created = run_manage("createdomain", "example.test", "--max-mailboxes", "5")
    assert created.returncode == 0, created.stderr
    assert Domain.objects.get().max_mailboxes == 5
    listed = run_manage("listmailboxes", "--domain", "example.test")
    assert (listed.returncode, listed.stdout) == (
        0,
        b"address  active  messages  used  quota  percent\n0 mailboxes\n",
    )
    unknown = run_manage("listmailboxes", "--domain", "nowhere.test")
    assert unknown.returncode == 1
    assert unknown.stderr == b"CommandError: no such domain: nowhere.test\n"


@pytest.mark.django_db
def test_operator_chosen_passwords_must_pass_the_configured_validators(monkeypatch, make_mailbox):
    make_mailbox("alice@example.test")
    feed_stdin(monkeypatch, "short\n")
    assert fails("createmailbox", "bob@example.test", "--password-stdin") == (
        "password rejected: This password is too short. It must contain at least 8 characters."
    )
    feed_stdin(monkeypatch, "password\n")
    assert fails("setpassword", "alice@example.test", "--password-stdin") == (
        "password rejected: This password is too common."
    )
    assert user("alice@example.test").check_password("correct horse")


@pytest.mark.django_db
def test_sizes_beyond_the_database_columns_are_refused_cleanly():
    assert fails("createdomain", "x.test", "--quota", "99999999999G") == (
        f"quota bytes must be between 0 and {2**63 - 1}"
    )
    assert fails("createdomain", "x.test", "--max-mailboxes", str(2**31)) == (
        f"max mailboxes must be between 0 and {2**31 - 1}"
    )
    assert not Domain.objects.exists()
