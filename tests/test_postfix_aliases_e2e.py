"""Postfix expands our aliases itself: ``virtual_alias_maps`` from the database, as the README says.

On PostgreSQL through the ``pgsql:`` table over the view ``exportaliases --sql-view`` creates; on
SQLite through the file ``exportaliases --postfix`` writes and ``postmap`` turns into a hash
table. Either way one message to an alias, an alias domain's address and a forward reaches each
mailbox once over LMTP, and the outside destination is Postfix's to send (here: discarded, logged).
The README's lines are the ones applied (paths, port and database credentials changed).
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from django.db import connection

from mailadmin.hosting import aliases, postfixmap
from mailadmin.hosting.actors import Actor
from mailadmin.models import Message
from tests.conftest import run_manage
from tests.lmtp_server import HOST, running_lmtp
from tests.test_lmtp_e2e import (
    DELIVERY_TIMEOUT,
    POSTFIX,
    QUEUED,
    README,
    SENDER,
    SWAKS,
    postfix_root,  # noqa: F401 (the postfix_root fixture)
    readme_postfix_settings,
    running_postfix,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.skipif(POSTFIX is None, reason="Postfix is not installed (make system-deps installs it)"),
    pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (make system-deps installs it)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master process has to be started as root"),
]

POSTMAP = Path(POSTFIX).with_name("postmap") if POSTFIX else None
POSTCONF = Path(POSTFIX).with_name("postconf") if POSTFIX else None
CLI = Actor.cli()
# Outside mail is Postfix's to send; here its default transport discards it, saying so in the log.
OUTSIDE_TRANSPORT = "discard:sent-outside"


def readme_block(name: str) -> str:
    """The fenced block between the README's ``<!-- name -->`` markers."""
    text = README.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"README markers {name} missing"
    fenced = re.search(r"^```[^\n]*\n(.*?)^```", text.split(start, 1)[1].split(end, 1)[0], re.M | re.S)
    assert fenced, f"no fenced block between the README's {name} markers"
    return fenced.group(1)


def settings_of(block: str) -> dict[str, str]:
    """``name = value`` lines of a main.cf or map file block (comments skipped)."""
    found = {}
    for line in block.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, equals, value = line.partition("=")
            assert equals, f"not a setting: {line!r}"
            found[name.strip()] = value.strip()
    return found


def stored_count(address: str) -> int:
    return Message.objects.filter(mailbox__user__username=address).count()


def pgsql_alias_map(root: Path) -> str:
    """The README's view and map file against the test database; the main.cf value for them."""
    with connection.cursor() as cursor:
        cursor.execute(run_manage("exportaliases", "--sql-view").stdout.decode())
    [line] = readme_block("postfix-aliases-main.cf").strip().splitlines()
    name, _, value = line.partition(" = ")
    assert (name, value) == ("virtual_alias_maps", "proxy:pgsql:/etc/postfix/mailadmin-aliases.cf")
    documented = settings_of(readme_block("postfix-aliases-pgsql.cf"))
    assert documented["query"] == f"SELECT destination FROM {postfixmap.VIEW_NAME} WHERE source = '%s'"
    database = connection.settings_dict
    applied = {
        **documented,
        "hosts": database["HOST"] or "127.0.0.1",
        "dbname": database["NAME"],
        "user": database["USER"],
        "password": database["PASSWORD"] or "",
    }
    map_file = root / "mailadmin-aliases.cf"
    map_file.write_text("".join(f"{key} = {value}\n" for key, value in applied.items()))
    map_file.chmod(0o644)
    return value.replace("/etc/postfix/mailadmin-aliases.cf", str(map_file))


def hash_alias_map(root: Path, config: Path) -> str:
    """The README's export and postmap commands on a file of the test's; the main.cf value."""
    block = readme_block("postfix-aliases-hash")
    assert "python manage.py exportaliases --postfix /etc/postfix/mailadmin-aliases" in block
    assert "postmap /etc/postfix/mailadmin-aliases" in block
    assert "# main.cf: virtual_alias_maps = hash:/etc/postfix/mailadmin-aliases" in block
    map_file = root / "mailadmin-aliases"
    exported = run_manage("exportaliases", "--postfix", str(map_file))
    assert exported.returncode == 0, exported.stderr
    made = subprocess.run([POSTMAP, "-c", str(config), str(map_file)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    return f"hash:{map_file}"


def test_postfix_expands_aliases_alias_domains_and_forwards_from_our_tables(
    tmp_path: Path,
    postfix_root: Path,  # noqa: F811 (the fixture imported above)
    make_mailbox,
    settings,
) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    main_cf, _ = readme_postfix_settings()
    domain, second = main_cf["virtual_mailbox_domains"].replace(",", " ").split()[:2]
    user, other = f"user@{domain}", f"other@{domain}"
    make_mailbox(user)
    make_mailbox(other)
    aliases.create_alias(CLI, f"team@{domain}", [user, other])
    aliases.create_alias(CLI, f"fwd@{domain}", ["someone@remote.test"])
    aliases.create_alias_domain(CLI, second, domain)
    recipients = [f"team@{domain}", f"user@{second}", f"fwd@{domain}"]

    config_probe = postfix_root / "probe"
    config_probe.mkdir()
    (config_probe / "main.cf").write_text("")
    map_types = subprocess.run([POSTCONF, "-c", str(config_probe), "-m"], capture_output=True, text=True)
    if connection.vendor == "postgresql":
        if "pgsql" not in map_types.stdout.split():
            pytest.skip("Postfix has no pgsql: tables (make system-deps installs postfix-pgsql)")
        alias_map = pgsql_alias_map(postfix_root)
    else:
        alias_map = hash_alias_map(postfix_root, config_probe)

    try:
        with running_lmtp(tmp_path / "lmtp") as lmtp:
            applied = {
                **main_cf,
                "virtual_transport": f"lmtp:inet:{HOST}:{lmtp.port}",
                "virtual_alias_maps": alias_map,
                "default_transport": OUTSIDE_TRANSPORT,
            }
            with running_postfix(postfix_root, applied) as postfix:
                sent = subprocess.run(
                    [SWAKS, "--server", f"{HOST}:{postfix.smtp_port}", "--to", ",".join(recipients),
                     "--from", SENDER, "--helo", "client.e2e.invalid", "--timeout", "30"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )  # fmt: skip
                assert sent.returncode == 0 and QUEUED.search(sent.stdout), f"{sent.stdout}{sent.stderr}"
                deadline = time.monotonic() + DELIVERY_TIMEOUT
                while "orig_to=<fwd@" not in postfix.log() or stored_count(other) < 1:
                    assert time.monotonic() < deadline, f"not delivered; Postfix log:\n{postfix.log()}"
                    time.sleep(0.1)
                log = postfix.log()
    finally:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"DROP VIEW IF EXISTS {postfixmap.VIEW_NAME}")

    # user is reached twice (team, and user@ in the alias domain): Postfix sends one copy.
    assert (stored_count(user), stored_count(other)) == (1, 1)
    assert f"to=<{other}>, orig_to=<team@{domain}>, relay={HOST}" in log
    assert re.search(rf"to=<{re.escape(user)}>, orig_to=<(team@{domain}|user@{second})>, relay={HOST}", log)
    assert f"to=<someone@remote.test>, orig_to=<fwd@{domain}>, relay=none" in log
    assert "status=sent (sent-outside)" in log
