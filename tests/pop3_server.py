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
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

import pytest
import trustme

from tests.conftest import PROJECT_DIR, child_environment

HOST = "127.0.0.1"
PASSWORD = "correct horse"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
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
class Pop3Process:
    """One runpop3 child: its ports, certificates, output and memory figures."""

    process: subprocess.Popen
    port: int  # plain POP3 with STLS
    tls_port: int  # implicit TLS
    certificates: Certificates
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ca_file(self) -> Path:
        return self.certificates.ca_file

    def client_context(self) -> ssl.SSLContext:
        return self.certificates.client_context()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def memory_kib(self, key: str) -> int:
        """A ``/proc/PID/status`` figure in KiB: VmRSS (now) or VmHWM (peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise KeyError(key)

    def reset_peak_memory(self) -> int:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); return that RSS in KiB."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.memory_kib("VmHWM")

    def connect(self, *, tls: bool = False, timeout: float = SOCKET_TIMEOUT) -> "RawPop3":
        context = self.client_context() if tls else None
        return RawPop3.connect(self.tls_port if tls else self.port, context, timeout=timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _pump_stdout(process: subprocess.Popen, lines: list[str], arrived: "queue.Queue[str]") -> None:
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        arrived.put(line)


def _start(
    directory: Path, certificates: Certificates, settings: dict[str, str], attempt: int
) -> Pop3Process:
    port, tls_port = free_port(), free_port()
    stderr_path = directory / f"runpop3-{port}-{attempt}.stderr"
    command = [
        sys.executable,
        str(PROJECT_DIR / "manage.py"),
        "runpop3",
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
    ]
    environment = child_environment(PYTHONUNBUFFERED="1", **{**FAST_SETTINGS, **settings})
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=PROJECT_DIR, env=environment, stdout=subprocess.PIPE, stderr=stderr
        )
    server = Pop3Process(process, port, tls_port, certificates, stderr_path)
    arrived: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump_stdout, args=(process, server.stdout_lines, arrived), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    listening: set[str] = set()
    while listening != {"POP3", "POP3S"}:
        try:
            line = arrived.get(timeout=0.1)
        except queue.Empty:
            if process.poll() is not None:
                raise RuntimeError(
                    f"runpop3 exited with {process.returncode}:\n{server.stderr_text()}"
                ) from None
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"runpop3 did not start listening:\n{server.stderr_text()}") from None
            continue
        if f"POP3 listening on {HOST}:{port}" in line:
            listening.add("POP3")
        elif f"POP3S listening on {HOST}:{tls_port}" in line:
            listening.add("POP3S")
    return server


@contextmanager
def running_pop3(directory: Path, **settings: str) -> Iterator[Pop3Process]:
    """Run ``manage.py runpop3`` for the duration of the block; it must exit 0 on SIGTERM.

    A test that ends the process itself (SIGKILL, its own SIGTERM) is not checked again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    certificates_file = directory / "ca.pem"
    certificates = (
        Certificates(certificates_file, directory / "server-chain.pem", directory / "server-key.pem")
        if certificates_file.exists()
        else make_certificates(directory)
    )
    for attempt in range(3):  # a free port can be taken by someone else before the child binds it
        try:
            server = _start(directory, certificates, settings, attempt)
            break
        except RuntimeError as error:
            if "cannot listen" not in str(error) or attempt == 2:
                raise
    stopped_by_test = False
    try:
        yield server
        stopped_by_test = server.process.poll() is not None
    except BaseException:
        print(f"--- runpop3 on port {server.port} stderr (last 8000 characters) ---")
        print(server.stderr_text()[-8000:])
        raise
    finally:
        if server.process.poll() is None:
            code = server.terminate()
        else:
            code = server.process.returncode
    if not stopped_by_test:
        assert code == 0, f"runpop3 exited with {code} on SIGTERM:\n{server.stderr_text()}"


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


class RawPop3:
    """Bytes over a socket, with just enough parsing to check exact server output."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.received = 0  # every byte read from the server, greeting included

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

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int = 65536) -> bool:
        data = self.sock.recv(size)
        if not data:
            return False
        self.received += len(data)
        self.buffer += data
        return True

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

    def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes; fails if it is still open after the timeout."""
        try:
            while self._fill():
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass  # closed abortively: still closed
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open; it sent {bytes(self.buffer)!r}"
            ) from None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


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
