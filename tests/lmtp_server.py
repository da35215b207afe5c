"""A real ``manage.py runlmtp`` child process, and a tiny raw LMTP client.

``running_lmtp(directory, **settings)`` starts the server against the test database (see
``tests.conftest.child_environment``) on a free loopback port, or on a unix socket with
``socket_path=``, waits for its "LMTP listening" line, and on exit sends SIGTERM and checks that
the process exits 0. Settings are environment variables (``LMTP_*``, ``MAILADMIN_*``, even
``DATABASE_URL``); ``LMTP_HOSTNAME`` defaults to ``lmtp.test`` so greetings are predictable.

The ``lmtp_server`` fixture wraps it for one test with the default settings; tests that need
other settings, or several servers, call ``running_lmtp`` themselves.
"""

import smtplib
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.daemons import HOST, DaemonProcess, RawClient, free_port, running_daemon, start_daemon
from tests.lmtp_replies import BYE, GREETING, HOSTNAME

SOCKET_TIMEOUT = 10.0


@dataclass
class LmtpProcess(DaemonProcess):
    """One runlmtp child: where it listens, its output and its memory figures."""

    command = "runlmtp"

    port: int | None
    socket_path: Path | None

    def connect(self, *, timeout: float = SOCKET_TIMEOUT) -> "RawLmtp":
        """A raw client that has read the 220 greeting."""
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
        else:
            sock = socket.create_connection((HOST, self.port), timeout=timeout)
        client = RawLmtp(sock)
        assert client.line() == GREETING
        return client

    def smtplib_client(self, *, timeout: float = SOCKET_TIMEOUT) -> smtplib.LMTP:
        if self.socket_path is not None:
            return smtplib.LMTP(str(self.socket_path), local_hostname="client.test", timeout=timeout)
        return smtplib.LMTP(HOST, self.port, local_hostname="client.test", timeout=timeout)


def _start(directory: Path, socket_path: Path | None, settings: dict[str, str], attempt: int) -> LmtpProcess:
    port = None if socket_path is not None else free_port()
    where = (
        ["--socket", str(socket_path)] if socket_path is not None else ["--bind", HOST, "--port", str(port)]
    )
    server = start_daemon(
        LmtpProcess,
        where,
        stderr_path=directory / f"runlmtp-{port or 'socket'}-{attempt}.stderr",
        environment={"LMTP_HOSTNAME": HOSTNAME, **settings},
        ready=[f"LMTP listening on {socket_path if socket_path is not None else f'{HOST}:{port}'}"],
        port=port,
        socket_path=socket_path,
    )
    # runlmtp prints its "listening" line before it installs its SIGTERM handler; one full
    # exchange proves the event loop is serving, so a SIGTERM from now on is handled.
    with server.connect() as probe:
        assert probe.command("QUIT") == BYE
    return server


def running_lmtp(
    directory: Path, *, socket_path: Path | None = None, **settings: str
) -> AbstractContextManager[LmtpProcess]:
    """Run ``manage.py runlmtp`` for the duration of a ``with`` block; it must exit 0 on SIGTERM
    (unless the test ended the process itself: SIGKILL, its own SIGTERM)."""
    return running_daemon(directory, lambda attempt: _start(directory, socket_path, settings, attempt))


@pytest.fixture(name="lmtp_server")
def lmtp_server_fixture(tmp_path: Path, transactional_db) -> Iterator[LmtpProcess]:
    """``lmtp_server``: one runlmtp with the default settings, for one test.

    Test modules import ``lmtp_server_fixture`` to make it available."""
    with running_lmtp(tmp_path / "lmtp") as server:
        yield server


# --- A tiny raw LMTP client -------------------------------------------------------------------


class RawLmtp(RawClient):
    """Bytes over a socket, reading replies line by line so a test sees every line the server sent."""

    def line(self) -> str:
        """One reply line without its CRLF; raises EOFError if the server closed first."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not self._fill():
                raise EOFError(f"connection closed; partial line {bytes(self.buffer)!r}")
        line = bytes(self.buffer[:end]).decode()
        del self.buffer[: end + 2]
        return line

    def lines(self, count: int) -> list[str]:
        return [self.line() for _ in range(count)]

    def reply(self) -> list[str]:
        """Every line of one (possibly multi-line) reply."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        return lines

    def command(self, text: str) -> str:
        """Send one command; return its single-line reply."""
        self.send(text.encode() + b"\r\n")
        [line] = self.reply()
        return line
