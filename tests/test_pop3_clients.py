"""Real POP3 clients against a real runpop3: poplib, curl, fetchmail, getmail6, mpop, openssl.

Each client fetches the messages the store holds and the test compares what arrived with the
stored bytes (exactly where the client hands over the message unchanged, by content where a
client adds its own headers or mbox framing).
"""

import mailbox as mailbox_files
import os
import poplib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin.delivery import deliver
from mailadmin.models import Mailbox, Message, Pop3Session
from tests.pop3_server import (
    HOST,
    PASSWORD,
    Pop3Process,
    pop3_server_fixture,  # noqa: F401 (the pop3_server fixture)
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ADDRESS = "alice@example.test"
CLIENT_TIMEOUT = 60

MESSAGES = [
    b"Subject: first\r\nFrom: bob@example.test\r\n\r\nHello, Alice.\r\n.leading dot\r\n..two dots\r\n",
    b"Subject: second\r\nFrom: carol@example.test\r\n\r\n.\r\nThe line above is a lone dot.\r\n",
    b"Subject: third\r\nFrom: dave@example.test\r\n\r\n"
    + b"".join(b"line %04d of a longer body\r\n" % n for n in range(300)),
]


@dataclass(frozen=True)
class StoredMessage:
    number: int
    pk: int
    uidl: str
    data: bytes  # exactly what RETR must carry, un-stuffed

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1]

    @property
    def header_block(self) -> bytes:
        return self.data[: self.data.index(b"\r\n\r\n") + 4]


@pytest.fixture
def stored_mail(make_mailbox) -> list[StoredMessage]:
    make_mailbox(ADDRESS)
    for message in MESSAGES:
        assert deliver([ADDRESS], [message])[0].delivered
    rows = Message.objects.for_maildrop(Mailbox.objects.get(user__username=ADDRESS)).values_list("pk", "uidl")
    return [
        StoredMessage(number, pk, uidl, b"".join(iter_message_bytes(pk)))
        for number, (pk, uidl) in enumerate(rows, 1)
    ]


def counters() -> tuple[int, int, int]:
    mailbox = Mailbox.objects.select_related("domain").get(user__username=ADDRESS)
    return mailbox.used_bytes, mailbox.used_messages, mailbox.domain.used_bytes


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


def run(
    command: list[str], *, input: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            command, check=False, input=input, capture_output=True, timeout=CLIENT_TIMEOUT, env=env
        )
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"") + (expired.stderr or b"")
        raise AssertionError(
            f"{command[0]} hung for {CLIENT_TIMEOUT} s:\n{output.decode(errors='replace')}"
        ) from None


def private_file(path: Path, text: str) -> Path:
    """Clients refuse configuration files with passwords that others can read."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def normalised(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# --- poplib --------------------------------------------------------------------------------


def joined(lines: list[bytes]) -> bytes:
    """poplib hands back un-stuffed lines without their CRLF."""
    return b"".join(line + b"\r\n" for line in lines)


def test_poplib_over_loopback_lists_retrieves_tops_and_deletes(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage]
) -> None:
    sizes = [len(message.data) for message in stored_mail]
    used_bytes, used_messages, domain_bytes = counters()
    client = poplib.POP3(HOST, pop3_server.port, timeout=5)
    try:
        assert client.user(ADDRESS) == b"+OK"
        assert client.pass_(PASSWORD) == b"+OK Logged in."
        assert client.stat() == (3, sum(sizes))
        response, listing, _ = client.list()
        assert response == b"+OK 3 messages (%d octets)" % sum(sizes)
        assert listing == [b"%d %d" % (n, size) for n, size in enumerate(sizes, 1)]
        response, uidls, _ = client.uidl()
        assert response == b"+OK 3 messages (%d octets)" % sum(sizes)
        assert uidls == [f"{message.number} {message.uidl}".encode() for message in stored_mail]
        for message in stored_mail:
            response, lines, _ = client.retr(message.number)
            assert response == b"+OK %d octets" % len(message.data)
            assert joined(lines) == message.data
        response, lines, _ = client.top(2, 0)
        assert response == b"+OK"
        assert joined(lines) == stored_mail[1].header_block
        assert client.dele(1) == b"+OK Marked to be deleted."
        assert client.stat() == (2, sum(sizes[1:]))
    finally:
        assert client.quit() == b"+OK Logging out, messages deleted."
    assert list(Message.objects.order_by("pk").values_list("pk", flat=True)) == [
        m.pk for m in stored_mail[1:]
    ]
    assert counters() == (used_bytes - sizes[0], used_messages - 1, domain_bytes - sizes[0])


def test_poplib_stls_upgrades_and_the_capabilities_change(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage]
) -> None:
    client = poplib.POP3(HOST, pop3_server.port, timeout=5)
    try:
        assert "STLS" in client.capa()
        client.stls(context=pop3_server.client_context())
        capabilities = client.capa()
        assert "STLS" not in capabilities
        assert capabilities["USER"] == []
        assert capabilities["SASL"] == ["PLAIN", "LOGIN"]
        client.user(ADDRESS)
        client.pass_(PASSWORD)
        assert joined(client.retr(1)[1]) == stored_mail[0].data
    finally:
        client.quit()
    row = wait_for(lambda: Pop3Session.objects.filter(username=ADDRESS, ended_at__isnull=False).first())
    assert (row.implicit_tls, row.tls_version.startswith("TLSv1."), row.end_reason) == (False, True, "quit")


def test_poplib_pop3s_on_the_implicit_tls_port(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage]
) -> None:
    client = poplib.POP3_SSL(HOST, pop3_server.tls_port, context=pop3_server.client_context(), timeout=5)
    try:
        assert "STLS" not in client.capa()
        client.user(ADDRESS)
        client.pass_(PASSWORD)
        for message in stored_mail:
            assert joined(client.retr(message.number)[1]) == message.data
    finally:
        client.quit()
    row = wait_for(lambda: Pop3Session.objects.filter(username=ADDRESS, ended_at__isnull=False).first())
    assert (row.implicit_tls, row.retr_count, row.end_reason) == (True, 3, "quit")


# --- curl ----------------------------------------------------------------------------------


def curl(server: Pop3Process, url: str, *extra: str) -> bytes:
    result = run([tool("curl"), "-sS", "--max-time", "20", *extra, "-u", f"{ADDRESS}:{PASSWORD}", url])
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_curl_retrieves_exact_bytes_over_stls_and_pop3s(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage]
) -> None:
    tls = ["--ssl-reqd", "--cacert", str(pop3_server.ca_file)]
    assert curl(pop3_server, f"pop3://{HOST}:{pop3_server.port}/1", *tls) == stored_mail[0].data
    assert curl(pop3_server, f"pop3://{HOST}:{pop3_server.port}/2", *tls) == stored_mail[1].data
    assert curl(pop3_server, f"pop3s://{HOST}:{pop3_server.tls_port}/3", *tls) == stored_mail[2].data
    rows = wait_for(
        lambda: (
            list(Pop3Session.objects.filter(ended_at__isnull=False))
            if Pop3Session.objects.filter(ended_at__isnull=False).count() == 3
            else None
        )
    )
    assert sorted((row.implicit_tls, row.tls_version.startswith("TLSv1.")) for row in rows) == [
        (False, True),
        (False, True),
        (True, True),
    ]


def test_curl_lists_the_maildrop(pop3_server: Pop3Process, stored_mail: list[StoredMessage]) -> None:
    listing = curl(pop3_server, f"pop3://{HOST}:{pop3_server.port}/")
    assert listing == b"".join(b"%d %d\r\n" % (m.number, len(m.data)) for m in stored_mail)


# --- fetchmail -----------------------------------------------------------------------------


def test_fetchmail_over_stls_delivers_every_message_and_keeps_them(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage], tmp_path: Path
) -> None:
    fetchmail = tool("fetchmail")
    delivered = tmp_path / "delivered.txt"
    rc = private_file(
        tmp_path / "fetchmailrc",
        f"""set no syslog
poll {HOST} with protocol pop3 port {pop3_server.port} timeout 20:
    user "{ADDRESS}" there with password "{PASSWORD}" is root here
    sslproto "TLS1.2+" sslcertck sslcertfile "{pop3_server.ca_file}" sslcommonname "localhost"
    keep
    mda "cat >> {delivered}"
""",
    )
    environment = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    command = [fetchmail, "-f", str(rc), "-v", "--nodetach", "--idfile", str(tmp_path / "fetchids")]
    result = run(command, env=environment)
    log = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, log  # 0: mail was retrieved
    assert "POP3> STLS" in log and "upgrade to TLS succeeded" in log, log
    # fetchmail probes the obsolete LAST command; the -ERR must not stop it.
    assert "POP3> LAST\nfetchmail: POP3< -ERR Unknown command.\nfetchmail: POP3> UIDL" in log, log
    assert "3 messages for alice@example.test" in log, log
    text = normalised(delivered.read_bytes())
    for message in stored_mail:
        assert normalised(message.body) in text, message.number
    assert Message.objects.count() == 3  # keep


# --- getmail6 ------------------------------------------------------------------------------


def test_getmail_over_pop3s_fetches_everything_once(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage], tmp_path: Path
) -> None:
    getmail = tool("getmail")
    getmail_dir = tmp_path / "getmail"
    getmail_dir.mkdir()
    inbox = tmp_path / "inbox.mbox"
    rc = private_file(
        getmail_dir / "getmailrc",
        f"""[retriever]
type = SimplePOP3SSLRetriever
server = {HOST}
port = {pop3_server.tls_port}
username = {ADDRESS}
password = {PASSWORD}
ca_certs = {pop3_server.ca_file}
ssl_cert_hostname = {HOST}
timeout = 20

[destination]
type = MDA_external
path = /bin/sh
arguments = ("-c", "cat >> {inbox}")
unixfrom = true
allow_root_commands = true

[options]
read_all = false
delete = false
delivered_to = false
received = false
verbose = 2
""",
    )
    command = [getmail, "--getmaildir", str(getmail_dir), "--rcfile", str(rc)]
    first = run(command)
    assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
    total = sum(len(message.data) for message in stored_mail)
    assert f"3 messages ({total} bytes) retrieved, 0 skipped" in first.stdout.decode(), first.stdout.decode()
    arrived = [message.as_bytes() for message in mailbox_files.mbox(str(inbox))]
    assert len(arrived) == 3
    for message, got in zip(stored_mail, arrived, strict=True):
        assert normalised(message.body) in normalised(got), message.number
    size_after_first = inbox.stat().st_size
    second = run(command)
    assert second.returncode == 0, second.stdout.decode() + second.stderr.decode()
    assert "0 messages (0 bytes) retrieved, 3 skipped" in second.stdout.decode(), second.stdout.decode()
    assert inbox.stat().st_size == size_after_first  # the UIDLs were stable: nothing fetched again
    assert Message.objects.count() == 3


# --- mpop ----------------------------------------------------------------------------------


def test_mpop_with_starttls_and_pipelining_delivers_to_an_mbox_and_keeps_the_mail(
    pop3_server: Pop3Process, stored_mail: list[StoredMessage], tmp_path: Path
) -> None:
    mpop = tool("mpop")
    inbox = tmp_path / "mpop.mbox"
    conf = private_file(
        tmp_path / "mpoprc",
        f"""defaults
timeout 20

account test
host {HOST}
port {pop3_server.port}
user {ADDRESS}
password {PASSWORD}
auth plain
tls on
tls_starttls on
tls_trust_file {pop3_server.ca_file}
delivery mbox {inbox}
keep on
uidls_file {tmp_path / "mpop-uidls"}
""",
    )
    result = run([mpop, "-C", str(conf), "--debug", "test"], env={**os.environ, "HOME": str(tmp_path)})
    log = (result.stdout + result.stderr).decode(errors="replace").replace("\r\n", "\n")
    assert result.returncode == 0, log
    assert "--> STLS\n<-- +OK Begin TLS negotiation now." in log, log
    assert "--> RETR 1\n--> RETR 2\n--> RETR 3\n<-- +OK" in log, log  # pipelined, as PIPELINING allows
    arrived = [message.as_bytes() for message in mailbox_files.mbox(str(inbox))]
    assert len(arrived) == 3, log
    for message, got in zip(stored_mail, arrived, strict=True):
        assert normalised(message.body) in normalised(got), message.number
    assert Message.objects.count() == 3


# --- openssl s_client ----------------------------------------------------------------------


def test_openssl_starttls_pop3_shows_the_post_tls_capabilities(pop3_server: Pop3Process) -> None:
    openssl = tool("openssl")
    result = run(
        [
            openssl,
            "s_client",
            "-connect",
            f"{HOST}:{pop3_server.port}",
            "-starttls",
            "pop3",
            "-CAfile",
            str(pop3_server.ca_file),
            "-verify_return_error",
            "-verify_ip",
            HOST,
            "-quiet",
        ],
        input=b"CAPA\r\nQUIT\r\n",
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    lines = output.splitlines()
    assert "USER" in lines and "SASL PLAIN LOGIN" in lines and "STLS" not in lines, output
    assert lines[-1] == "+OK Logging out."


def test_openssl_on_the_implicit_tls_port_gets_the_greeting(pop3_server: Pop3Process) -> None:
    openssl = tool("openssl")
    result = run(
        [
            openssl,
            "s_client",
            "-connect",
            f"{HOST}:{pop3_server.tls_port}",
            "-CAfile",
            str(pop3_server.ca_file),
            "-verify_return_error",
            "-verify_ip",
            HOST,
            "-quiet",
        ],
        input=b"QUIT\r\n",
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    assert output.splitlines() == ["+OK POP3 server ready.", "+OK Logging out."]
