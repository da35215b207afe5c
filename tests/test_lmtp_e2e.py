"""A real MTA end to end: swaks -> Postfix (smtpd, queue, lmtp client) -> runlmtp -> store -> runpop3.

Postfix runs as a private instance: its own configuration, queue and log under ``tmp_path``, an
smtpd on a free loopback port, nothing on port 25. The ``main.cf`` lines that route the hosted
domains to LMTP are read from the README's Postfix section, so the documented configuration is
the tested one (only the port is changed to the test server's).
"""

import os
import poplib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailadmin.hosting.store import iter_message_bytes
from mailadmin.models import Message
from tests.conftest import PROJECT_DIR
from tests.lmtp_server import HOST, running_lmtp
from tests.pop3_server import PASSWORD, free_port, running_pop3, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

POSTFIX = shutil.which("postfix") or next(
    (path for path in ("/usr/sbin/postfix", "/sbin/postfix") if os.access(path, os.X_OK)), None
)
SWAKS = shutil.which("swaks")
README = PROJECT_DIR / "README.md"
README_START, README_END = "<!-- postfix-main.cf -->", "<!-- /postfix-main.cf -->"
README_LMTP_TRANSPORT = "lmtp:inet:127.0.0.1:2424"
DELIVERY_TIMEOUT = 30.0
SENDER = "someone@remote.test"
QUEUED = re.compile(r"<-  250 2\.0\.0 Ok: queued as [0-9A-F]+")
POP3_LOGGED_IN = b"+OK Logged in."

# The message swaks sends: dots at line starts (swaks stuffs them, Postfix relays them stuffed
# over LMTP, runlmtp unstuffs them, runpop3 stuffs them again, poplib unstuffs them).
HEADER_LINES = [
    b"Subject: through postfix",
    b"From: Someone <someone@remote.test>",
    b"To: {address}",
    b"Message-ID: <e2e-lmtp-1@remote.test>",
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000",
]
BODY_LINES = [
    b"First line of the body.",
    b".a line starting with a dot",
    b"..two dots",
    b".",
    b"after a line that was only a dot",
    b"trailing spaces   ",
    b"",
    b"Last line.",
]

# Just the daemons this path needs, none chrooted (the queue is a temporary directory).
MASTER_CF = """\
{listener} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

# The instance's own paths and loopback-only listening; the README's lines are appended after.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = mx.e2e.invalid
mydestination =
alias_maps =
alias_database =
biff = no
# A first delivery attempt that defers is retried within seconds, not minutes.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


def readme_postfix_settings() -> tuple[dict[str, str], str]:
    """The ``name = value`` lines of the README's marked main.cf block, and the block itself."""
    text = README.read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1, "README Postfix markers missing"
    marked = text.split(README_START, 1)[1].split(README_END, 1)[0]
    fenced = re.search(r"^```[^\n]*\n(.*?)^```", marked, re.MULTILINE | re.DOTALL)
    assert fenced, "no fenced block between the README's Postfix markers"
    block = fenced.group(1)
    settings = {}
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        assert equals, f"not a main.cf setting: {line!r}"
        settings[name.strip()] = value.strip()
    return settings, block


class PostfixInstance:
    def __init__(self, root: Path, smtp_port: int, main_cf_extra: dict[str, str]) -> None:
        self.root = root
        self.config = root / "config"
        self.smtp_port = smtp_port
        self.config.mkdir()
        (root / "queue").mkdir()
        main_cf = MAIN_CF.format(root=root) + "".join(f"{k} = {v}\n" for k, v in main_cf_extra.items())
        (self.config / "main.cf").write_text(main_cf)
        (self.config / "master.cf").write_text(MASTER_CF.format(listener=f"{HOST}:{smtp_port}"))

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return "(no maillog)"

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        """``postfix -c CONFIG ARGS``; its diagnostics go to the maillog, not to stderr."""
        return subprocess.run(
            [POSTFIX, "-c", str(self.config), *args], capture_output=True, text=True, timeout=60
        )

    def running(self) -> bool:
        return self.postfix("status").returncode == 0


@contextmanager
def running_postfix(root: Path, main_cf_extra: dict[str, str]) -> Iterator[PostfixInstance]:
    instance = PostfixInstance(root, free_port(), main_cf_extra)
    check = instance.postfix("check")
    assert check.returncode == 0, f"postfix check failed: {check.stdout}{check.stderr}\n{instance.log()}"
    start = instance.postfix("start")
    assert start.returncode == 0, f"postfix start failed: {start.stdout}{start.stderr}\n{instance.log()}"
    stopped = False
    try:
        yield instance
        stop = instance.postfix("stop")
        assert stop.returncode == 0, f"postfix stop failed: {stop.stdout}{stop.stderr}\n{instance.log()}"
        stopped = True
    except BaseException:
        print(f"--- Postfix maillog ---\n{instance.log()[-8000:]}")
        raise
    finally:
        if not stopped:
            instance.postfix("abort")
        deadline = time.monotonic() + 20
        while instance.running() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not instance.running(), f"Postfix master still running:\n{instance.log()}"


@pytest.fixture
def postfix_root() -> Iterator[Path]:
    """A directory for the Postfix instance that the unprivileged ``postfix`` user can reach.

    Postfix daemons open ``data_directory`` (and the master its lock file there) as the mail
    owner, and pytest's ``tmp_path`` lies under a mode 0700 directory of root's, so the instance
    gets a directory of its own, world-searchable, removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="postfix-") as directory:
        os.chmod(directory, 0o755)
        yield Path(directory)


def wait_until_stored(address: str, postfix: PostfixInstance) -> Message:
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while (message := Message.objects.filter(mailbox__user__username=address).first()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"not delivered within {DELIVERY_TIMEOUT} s; Postfix log:\n{postfix.log()}")
        time.sleep(0.1)
    return message


@pytest.mark.skipif(POSTFIX is None, reason="Postfix is not installed (make system-deps installs it)")
@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (make system-deps installs it)")
@pytest.mark.skipif(os.geteuid() != 0, reason="a Postfix master process has to be started as root")
def test_message_sent_to_postfix_reaches_pop3_through_the_readme_lmtp_configuration(
    tmp_path: Path, postfix_root: Path, make_mailbox
) -> None:
    settings, block = readme_postfix_settings()
    assert settings["virtual_transport"] == README_LMTP_TRANSPORT
    assert "lmtp:unix:" in block  # the documented alternative for runlmtp --socket
    domain = settings["virtual_mailbox_domains"].replace(",", " ").split()[0]
    address = f"user@{domain}"
    make_mailbox(address)
    message_file = tmp_path / "message.eml"
    header = [line.replace(b"{address}", address.encode()) for line in HEADER_LINES]
    # No final newline: swaks always sends CRLF before the closing dot, and would add a line.
    message_file.write_bytes(b"\n".join([*header, b"", *BODY_LINES]))

    with running_lmtp(tmp_path / "lmtp") as lmtp:
        applied = {**settings, "virtual_transport": f"lmtp:inet:{HOST}:{lmtp.port}"}
        with running_postfix(postfix_root, applied) as postfix:
            sent = subprocess.run(
                [
                    SWAKS,
                    "--server", f"{HOST}:{postfix.smtp_port}",
                    "--to", address,
                    "--from", SENDER,
                    "--helo", "client.e2e.invalid",
                    "--data", str(message_file),
                    "--timeout", "30",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )  # fmt: skip
            assert sent.returncode == 0 and QUEUED.search(sent.stdout), f"{sent.stdout}{sent.stderr}"
            stored = wait_until_stored(address, postfix)
            wait_for(lambda: f"status=sent (250 2.0.0 <{address}> Saved)" in postfix.log())  # logged after
    stored_bytes = b"".join(iter_message_bytes(stored.pk))

    with running_pop3(tmp_path / "pop3") as pop3:
        client = poplib.POP3(HOST, pop3.port, timeout=10)
        try:
            client.user(address)
            assert client.pass_(PASSWORD).startswith(POP3_LOGGED_IN)
            response, lines, _ = client.retr(1)
            assert response.startswith(b"+OK")
            client.quit()
        finally:
            client.close()

    assert lines[:2] == [f"Return-Path: <{SENDER}>".encode(), f"Delivered-To: {address}".encode()]
    assert any(line.startswith(b"Received: from client.e2e.invalid") for line in lines)  # via Postfix
    separator = lines.index(b"")
    assert set(header) <= set(lines[:separator])
    assert lines[separator + 1 :] == BODY_LINES
    assert b"".join(line + b"\r\n" for line in lines) == stored_bytes
    assert stored.envelope_sender == SENDER and stored.subject == "through postfix"
