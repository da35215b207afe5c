"""A real ``manage.py runpop3`` child process on free loopback ports, and a tiny raw POP3 client.

``running_pop3(directory, **settings)`` starts the server against the test database (see
``tests.conftest.child_environment``) with a certificate made by ``trustme`` for 127.0.0.1,
waits for both "listening" lines on its stdout, and on exit sends SIGTERM and checks that the
process exits 0. Settings are POP3_* environment variables; the defaults here make tests fast
(no failure delay, no penalty, a 0.2 s monitor tick).

The ``pop3_server`` fixture wraps it for one test; tests needing other settings or several
servers call ``running_pop3`` themselves.
"""

import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Self, TypeVar

import pytest
import trustme

from tests.daemons import HOST, DaemonProcess, RawClient, free_port, running_daemon, start_daemon

PASSWORD = "correct horse"
SOCKET_TIMEOUT = 5.0

FAST_SETTINGS = {
    "POP3_AUTH_FAILURE_DELAY": "0",
    "POP3_AUTH_PENALTY_MAX": "0",
    "POP3_MONITOR_INTERVAL": "0.2",
    "POP3_LEASE_TTL": "30",
}

T = TypeVar("T")


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA and checks the host name (IP SAN)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def directory_certificates(directory: Path) -> Certificates:
    """The certificates made earlier in ``directory``, or new ones."""
    certificates_file = directory / "ca.pem"
    if certificates_file.exists():
        return Certificates(certificates_file, directory / "server-chain.pem", directory / "server-key.pem")
    return make_certificates(directory)


def make_certificates(directory: Path) -> Certificates:
    ca = trustme.CA()
    # A subject CN too: fetchmail refuses a certificate without one, whatever its SANs say.
    server_cert = ca.issue_cert(HOST, "localhost", common_name="localhost")
    certificates = Certificates(
        directory / "ca.pem", directory / "server-chain.pem", directory / "server-key.pem"
    )
    ca.cert_pem.write_to_path(str(certificates.ca_file))
    server_cert.private_key_pem.write_to_path(str(certificates.key_file))
    with certificates.cert_file.open("wb") as handle:
        for blob in server_cert.cert_chain_pems:
            handle.write(blob.bytes())
    return certificates


@dataclass
class Pop3Process(DaemonProcess):
    """One runpop3 child: its ports, certificates, output and memory figures."""

    command = "runpop3"

    port: int  # plain POP3 with STLS
    tls_port: int  # implicit TLS
    certificates: Certificates

    def label(self) -> str:
        return f"runpop3 on port {self.port}"

    @property
    def ca_file(self) -> Path:
        return self.certificates.ca_file

    def client_context(self) -> ssl.SSLContext:
        return self.certificates.client_context()

    def connect(self, *, tls: bool = False, timeout: float = SOCKET_TIMEOUT) -> "RawPop3":
        context = self.client_context() if tls else None
        return RawPop3.connect(self.tls_port if tls else self.port, context, timeout=timeout)


def _start(directory: Path, settings: dict[str, str], attempt: int) -> Pop3Process:
    certificates = directory_certificates(directory)  # made by the first attempt, kept by later ones
    port, tls_port = free_port(), free_port()
    return start_daemon(
        Pop3Process,
        [
            "--bind",
            HOST,
            "--port",
            str(port),
            "--tls-port",
            str(tls_port),
            "--certfile",
            str(certificates.cert_file),
            "--keyfile",
            str(certificates.key_file),
        ],
        stderr_path=directory / f"runpop3-{port}-{attempt}.stderr",
        environment={**FAST_SETTINGS, **settings},
        ready=[f"POP3 listening on {HOST}:{port}", f"POP3S listening on {HOST}:{tls_port}"],
        port=port,
        tls_port=tls_port,
        certificates=certificates,
    )


def running_pop3(directory: Path, **settings: str) -> AbstractContextManager[Pop3Process]:
    """Run ``manage.py runpop3`` for the duration of a ``with`` block; it must exit 0 on SIGTERM.

    A test that ends the process itself (SIGKILL, its own SIGTERM) is not checked again.
    """
    return running_daemon(directory, lambda attempt: _start(directory, settings, attempt))


@pytest.fixture(name="pop3_server")
def pop3_server_fixture(tmp_path: Path, transactional_db) -> Iterator[Pop3Process]:
    """``pop3_server``: one runpop3 with the fast test settings, for one test.

    Test modules import ``pop3_server_fixture`` to make it available."""
    with running_pop3(tmp_path / "pop3") as server:
        yield server
    problems = [line for line in server.stderr_text().splitlines() if " INFO " not in line]
    if problems:  # shown with the report of a failing test
        print("--- runpop3 stderr, INFO lines left out ---\n" + "\n".join(problems[-100:]))


# --- A tiny raw POP3 client -----------------------------------------------------------------


class RawPop3(RawClient):
    """Bytes over a socket, with just enough parsing to check exact server output."""

    @classmethod
    def connect(
        cls,
        port: int,
        context: ssl.SSLContext | None = None,
        *,
        greeting: bool = True,
        timeout: float = SOCKET_TIMEOUT,
    ) -> Self:
        sock = socket.create_connection((HOST, port), timeout=timeout)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=HOST)
        client = cls(sock)
        if greeting:
            line = client.line()
            assert line.startswith(b"+OK"), line
        return client

    def line(self) -> bytes:
        """One reply line including its CRLF; raises EOFError if the server closed first."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not self._fill():
                raise EOFError(f"connection closed; partial line {bytes(self.buffer)!r}")
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def multiline_body(self) -> bytes:
        """The raw (still dot-stuffed) lines after a +OK, up to and including the terminator."""
        searched = 0
        while True:
            if self.buffer.startswith(b".\r\n"):
                end = 3
                break
            found = self.buffer.find(b"\r\n.\r\n", searched)
            if found >= 0:
                end = found + 5
                break
            searched = max(0, len(self.buffer) - 4)
            if not self._fill():
                raise EOFError("connection closed inside a multi-line reply")
        body = bytes(self.buffer[:end])
        del self.buffer[:end]
        return body

    def login(self, username: str, password: str = PASSWORD) -> bytes:
        assert self.command(f"USER {username}") == b"+OK\r\n"
        return self.command(f"PASS {password}")

    def retr(self, number: int) -> tuple[bytes, bytes]:
        """(status line, raw body with terminator) of RETR."""
        self.send(f"RETR {number}\r\n".encode())
        return self.retr_reply()

    def retr_reply(self) -> tuple[bytes, bytes]:
        """The next RETR reply (status line, raw body with terminator), for pipelined commands."""
        status = self.line()
        assert status.startswith(b"+OK"), status
        return status, self.multiline_body()


def unstuff(body_with_terminator: bytes) -> bytes:
    """The message bytes a multi-line RETR body carries (RFC 1939 s. 3), written independently
    of the server's own helper: drop the ``.`` line, then one leading dot from each line."""
    assert body_with_terminator.endswith(b".\r\n"), body_with_terminator[-20:]
    content = body_with_terminator[:-3]
    if not content:
        return b""
    assert content.endswith(b"\r\n")
    lines = content[:-2].split(b"\r\n")
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def sha256(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll until ``predicate()`` is truthy; return its value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def mebibytes(kib: int) -> float:
    return kib / 1024
