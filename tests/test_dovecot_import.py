"""Moving users over from Dovecot: importmailboxes --dovecot-passwd, Dovecot hashes in the CSV and
in setpassword --hash, all or nothing with numbered lines; listmailboxes and the admin count the
mailboxes whose hash is still a legacy one."""

import io
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password
from django.core.management import call_command
from django.core.management.base import CommandError

from mailadmin.hosting import dovecotpasswd, services, store
from mailadmin.hosting.actors import Actor
from mailadmin.models import AuditEntry, Mailbox
from tests.dovecot_tools import PASSWORD, WRONG_PASSWORD, doveadm_hash, needs_doveadm

pytestmark = [pytest.mark.django_db, needs_doveadm]

GiB = 1024**3
MiB = 1024**2


def run(*args: str, stdin: str | None = None) -> str:
    out = io.StringIO()
    if stdin is not None:
        old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        call_command(*args, stdout=out)
    finally:
        if stdin is not None:
            sys.stdin = old_stdin
    return out.getvalue()


def fails(*args: str, stdin: str | None = None) -> str:
    with pytest.raises(CommandError) as raised:
        run(*args, stdin=stdin)
    return str(raised.value)


def password_of(address: str) -> str:
    return get_user_model().objects.get(username=address).password


def passwd_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "passwd"
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


@pytest.fixture
def domains():
    for name in ("example.test", "other.test"):
        services.create_domain(Actor.cli(), name, default_mailbox_quota_bytes=5 * MiB)


# --- importmailboxes --dovecot-passwd --------------------------------------------------------


def test_a_passwd_file_imports_every_user_with_its_hash_and_quota(tmp_path, domains):
    sha512, ssha = doveadm_hash("SHA512-CRYPT"), doveadm_hash("SSHA")
    path = passwd_file(
        tmp_path,
        "# users moved from mail.example.test",
        f"alice@example.test:{sha512}:5000:5000::/var/vmail/example.test/alice::userdb_quota_rule=*:storage=1G",
        f"bob@example.test:{ssha}",
        "",
        f"carol@other.test:{doveadm_hash('ARGON2ID')}::::::quota_rule=*:storage=102400 mail=maildir:~/",
        f"dave@other.test:{doveadm_hash('PLAIN-MD5')}::::::userdb_quota_rule=*:bytes=2M:messages=500",
    )
    assert run("importmailboxes", "--dovecot-passwd", path) == (
        "created alice@example.test (quota 1.0 GiB)\n"
        "created bob@example.test (quota 5.0 MiB)\n"
        "created carol@other.test (quota 100.0 MiB)\n"
        "created dave@other.test (quota 2.0 MiB)\n"
        "imported 4 mailboxes\n"
    )
    quotas = dict(Mailbox.objects.values_list("user__username", "quota_bytes"))
    assert quotas == {
        "alice@example.test": GiB,
        "bob@example.test": 5 * MiB,  # no quota rule: the domain's default
        "carol@other.test": 100 * MiB,  # Dovecot's storage is in KiB without a unit
        "dave@other.test": 2 * MiB,
    }
    assert Mailbox.objects.get(user__username="dave@other.test").quota_messages == 500
    assert password_of("alice@example.test") == "dovecot$" + sha512.removeprefix("{SHA512-CRYPT}")
    assert password_of("bob@example.test") == f"dovecot${ssha}"
    for address in quotas:
        assert check_password(PASSWORD, password_of(address)), address
        assert not check_password(WRONG_PASSWORD, password_of(address)), address
    actions = list(AuditEntry.objects.order_by("pk").values_list("action", "object_name"))
    assert actions[-4:] == [("create", address) for address in quotas]


def test_a_password_without_a_scheme_is_read_as_crypt_as_dovecot_does(tmp_path, domains):
    crypt_hash = doveadm_hash("SHA256-CRYPT").removeprefix("{SHA256-CRYPT}")
    run("importmailboxes", "--dovecot-passwd", passwd_file(tmp_path, f"alice@example.test:{crypt_hash}"))
    assert check_password(PASSWORD, password_of("alice@example.test"))


PASSWD_REFUSALS = {
    "unknown scheme": (
        "{PLAIN}secret",
        "line 3: password hash: {PLAIN} is not a Dovecot scheme this server can check",
    ),
    "malformed hash": ("{SSHA512}abc", "line 3: password hash: not a valid {SSHA512} hash"),
    "no password": ("", "line 3: expected user:password, with Dovecot's optional fields after them"),
    "relative quota": (
        "{SSHA}1yF2tTnlfBFqqKMZ+YcqzrSAzZWhS988::::::userdb_quota_rule=*:storage=+100M",
        "line 3: quota rule '*:storage=+100M': a relative limit cannot be imported; give a size",
    ),
    "bad quota": (
        "{SSHA}1yF2tTnlfBFqqKMZ+YcqzrSAzZWhS988::::::userdb_quota_rule=*:storage=lots",
        "line 3: invalid size 'lots'",
    ),
}


@pytest.mark.parametrize("password, expected", PASSWD_REFUSALS.values(), ids=PASSWD_REFUSALS.keys())
def test_a_wrong_passwd_line_is_named_and_nothing_is_imported(tmp_path, domains, password, expected):
    path = passwd_file(
        tmp_path,
        f"alice@example.test:{doveadm_hash('SSHA')}",
        "# a comment",
        f"bob@example.test:{password}",
    )
    assert fails("importmailboxes", "--dovecot-passwd", path).startswith(expected)
    assert Mailbox.objects.count() == 0


def test_passwd_users_must_be_addresses_of_existing_domains_and_appear_once(tmp_path, domains):
    ssha = doveadm_hash("SSHA")
    bare = passwd_file(tmp_path, f"alice@example.test:{ssha}", f"bob:{ssha}")
    assert fails("importmailboxes", "--dovecot-passwd", bare) == (
        "line 2: 'bob' is not an address of the form local@domain"
    )
    twice = passwd_file(tmp_path, f"alice@example.test:{ssha}", f"Alice@Example.test:{ssha}")
    assert fails("importmailboxes", "--dovecot-passwd", twice) == (
        "line 2: alice@example.test is already on line 1"
    )
    unknown = passwd_file(tmp_path, f"alice@example.test:{ssha}", f"bob@nowhere.test:{ssha}")
    assert fails("importmailboxes", "--dovecot-passwd", unknown).startswith(
        "line 2: no such domain: nowhere.test"
    )
    assert Mailbox.objects.count() == 0


def test_a_passwd_dry_run_checks_everything_and_writes_nothing(tmp_path, domains):
    path = passwd_file(tmp_path, f"alice@example.test:{doveadm_hash('BLF-CRYPT')}")
    assert run("importmailboxes", "--dovecot-passwd", path, "--dry-run").splitlines() == [
        "would create alice@example.test (quota 5.0 MiB)",
        "dry run: 1 mailboxes would be created; nothing was written",
    ]
    assert Mailbox.objects.count() == 0


def test_importmailboxes_takes_a_csv_or_a_passwd_file_not_both(tmp_path):
    path = passwd_file(tmp_path, "alice@example.test:{SSHA}x")
    assert fails("importmailboxes") == "give either FILE.csv or --dovecot-passwd FILE"
    assert fails("importmailboxes", path, "--dovecot-passwd", path) == (
        "give either FILE.csv or --dovecot-passwd FILE"
    )


def test_the_passwd_parser_keeps_colons_of_the_extra_fields_and_reads_messages_in_a_rule():
    rows = dovecotpasswd.parse(
        io.StringIO(
            "a@example.test:{SSHA}1yF2tTnlfBFqqKMZ+YcqzrSAzZWhS988:1:1:Name:/home:/bin/false:"
            "userdb_quota_rule=*:storage=1G:messages=10 userdb_quota_rule2=Trash:storage=+10M\n"
        )
    )
    assert [(row.line, row.address, row.quota_bytes, row.quota_messages) for row in rows] == [
        (1, "a@example.test", GiB, 10)
    ]


# --- Dovecot hashes in the CSV import --------------------------------------------------------


def csv_file(tmp_path: Path, *rows: str) -> str:
    path = tmp_path / "mailboxes.csv"
    path.write_text("address,password,password_hash,quota\n" + "".join(f"{row}\n" for row in rows))
    return str(path)


def test_csv_rows_may_carry_dovecot_hashes(tmp_path, domains):
    path = csv_file(
        tmp_path,
        f'alice@example.test,,"{doveadm_hash("ARGON2I")}",1G',
        f"bob@example.test,,{doveadm_hash('MD5-CRYPT')},",
        "carol@example.test,a fine long password,,",
    )
    assert run("importmailboxes", path).splitlines()[-1] == "imported 3 mailboxes"
    for address in ("alice@example.test", "bob@example.test"):
        assert password_of(address).startswith("dovecot$")
        assert check_password(PASSWORD, password_of(address))
    assert password_of("carol@example.test").startswith("argon2$")


def test_a_csv_row_with_an_unusable_dovecot_hash_is_named_and_nothing_is_imported(tmp_path, domains):
    path = csv_file(
        tmp_path,
        f"alice@example.test,,{doveadm_hash('SSHA256')},",
        "bob@example.test,,{NOPE}abc,",
    )
    assert fails("importmailboxes", path).startswith(
        "line 3: password hash: {NOPE} is not a Dovecot scheme this server can check"
    )
    assert Mailbox.objects.count() == 0


# --- setpassword --hash and the service behind it --------------------------------------------


def test_setpassword_hash_reads_a_dovecot_hash_from_stdin_and_audits_it(make_mailbox):
    make_mailbox("alice@example.test")
    blf = doveadm_hash("BLF-CRYPT")
    assert run("setpassword", "alice@example.test", "--hash", stdin=blf + "\n") == (
        "password changed for alice@example.test\n"
    )
    assert password_of("alice@example.test") == "dovecot$" + blf.removeprefix("{BLF-CRYPT}")
    assert check_password(PASSWORD, password_of("alice@example.test"))
    entry = AuditEntry.objects.latest("pk")
    assert (entry.action, entry.object_name, entry.actor_kind) == (
        "set password",
        "alice@example.test",
        "cli",
    )


def test_setpassword_hash_refuses_an_unusable_hash_clearly_and_keeps_the_password(make_mailbox):
    make_mailbox("alice@example.test")
    before = password_of("alice@example.test")
    assert fails("setpassword", "alice@example.test", "--hash", stdin="{SHA512-CRYPT}$6$oops\n").startswith(
        "password hash: not a valid {SHA512-CRYPT} hash"
    )
    assert fails("setpassword", "alice@example.test", "--hash", stdin="not a hash\n") == (
        "password hash is not in a format the configured hashers accept"
    )
    assert fails("setpassword", "alice@example.test", "--hash", stdin="\n") == "empty password hash on stdin"
    assert password_of("alice@example.test") == before


def test_setpassword_takes_a_password_or_a_hash_not_both(make_mailbox):
    make_mailbox("alice@example.test")
    with pytest.raises(CommandError, match="not allowed with argument"):
        run("setpassword", "alice@example.test", "--hash", "--password-stdin", stdin="x\n")


def test_a_new_mailbox_may_be_created_with_a_dovecot_hash(domains):
    """The path the provisioning API takes: create_mailbox with password_hash."""
    ssha512 = doveadm_hash("SSHA512")
    services.create_mailbox(Actor.cli(), "new@example.test", password_hash=ssha512)
    assert password_of("new@example.test") == f"dovecot${ssha512}"
    with pytest.raises(store.InvalidInput, match=r"^password hash: \{XYZ\} is not a Dovecot scheme"):
        services.create_mailbox(Actor.cli(), "other@example.test", password_hash="{XYZ}abc")


# --- How many legacy hashes remain --------------------------------------------------------------


def three_mailboxes(make_mailbox) -> None:
    """alice and carol (a.test, b.test) with Dovecot hashes, bob with argon2."""
    for address in ("alice@a.test", "bob@a.test", "carol@b.test"):
        make_mailbox(address)
    services.set_password_hash(Actor.cli(), "alice@a.test", doveadm_hash("SSHA"))
    services.set_password_hash(Actor.cli(), "carol@b.test", doveadm_hash("SHA512-CRYPT"))


def test_listmailboxes_says_how_many_mailboxes_still_have_a_legacy_hash(make_mailbox):
    three_mailboxes(make_mailbox)
    assert run("listmailboxes").splitlines()[-2:] == [
        "3 mailboxes",
        "2 of them still have a legacy password hash (imported; replaced by argon2 at the next login)",
    ]
    assert run("listmailboxes", "--domain", "b.test").splitlines()[-2:] == [
        "1 mailbox",
        "1 of them still has a legacy password hash (imported; replaced by argon2 at the next login)",
    ]
    services.set_password(Actor.cli(), "carol@b.test", "a fine long password")
    assert run("listmailboxes", "--domain", "b.test").splitlines()[-1] == "1 mailbox"


def test_the_legacy_count_is_scoped_to_the_actors_domains(make_mailbox):
    three_mailboxes(make_mailbox)
    assert services.count_legacy_hashes(Actor.cli()) == 2
    b_admin = services.save_domain_administrator(Actor.cli(), "b-admin", ["b.test"], "a fine long password")
    user = get_user_model().objects.get(username=b_admin.username)
    assert services.count_legacy_hashes(Actor.for_user(user, "192.0.2.1")) == 1


def test_the_mailbox_change_list_filters_and_counts_legacy_hashes(client, make_mailbox):
    three_mailboxes(make_mailbox)
    get_user_model().objects.create_superuser("root", "root@example.test", "pw")
    client.login(username="root", password="pw")
    page = client.get("/admin/mailadmin/mailbox/").content.decode()
    assert "legacy (replaced at the next login) (2)" in page
    assert "argon2 (1)" in page
    legacy = client.get("/admin/mailadmin/mailbox/?password_hash=legacy").content.decode()
    assert "alice@a.test" in legacy and "carol@b.test" in legacy and "bob@a.test" not in legacy
    current = client.get("/admin/mailadmin/mailbox/?password_hash=current").content.decode()
    assert "bob@a.test" in current and "alice@a.test" not in current
