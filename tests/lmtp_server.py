"""A real ``manage.py runlmtp`` child process, and a tiny raw LMTP client.

``running_lmtp(directory, **settings)`` starts the server against the test database (see
``tests.conftest.child_environment``) on a free loopback port, or on a unix socket with
``socket_path=``, waits for its "LMTP listening" line, and on exit sends SIGTERM and checks that
the process exits 0. Settings are environment variables (``LMTP_*``, ``MAILADMIN_*``, even
``DATABASE_URL``); ``LMTP_HOSTNAME`` defaults to ``lmtp.test`` so greetings are predictable.

The ``lmtp_server`` fixture wraps it for one test with the default settings; tests that need
other settings, or several servers, call ``running_lmtp`` themselves.
"""

import queue
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

from tests.conftest import PROJECT_DIR, child_environment
from tests.pop3_server import free_port

HOST = "127.0.0.1"
HOSTNAME = "lmtp.test"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SOCKET_TIMEOUT = 10.0


@dataclass
class LmtpProcess:
    """One runlmtp child: where it listens, its output and its memory figures."""

    process: subprocess.Popen
    port: int | None
    socket_path: Path | None
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

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

    def connect(self, *, timeout: float = SOCKET_TIMEOUT) -> "RawLmtp":
        """A raw client that has read the 220 greeting."""
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(self.socket_path))
        else:
            sock = socket.create_connection((HOST, self.port), timeout=timeout)
        client = RawLmtp(sock)
        assert client.line() == f"220 {HOSTNAME} LMTP ready"
        return client

    def smtplib_client(self, *, timeout: float = SOCKET_TIMEOUT) -> smtplib.LMTP:
        if self.socket_path is not None:
            return smtplib.LMTP(str(self.socket_path), local_hostname="client.test", timeout=timeout)
        return smtplib.LMTP(HOST, self.port, local_hostname="client.test", timeout=timeout)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def _pump_stdout(process: subprocess.Popen, lines: list[str], arrived: "queue.Queue[str]") -> None:
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        arrived.put(line)


def _start(directory: Path, socket_path: Path | None, settings: dict[str, str], attempt: int) -> LmtpProcess:
    port = None if socket_path is not None else free_port()
    where = (
        ["--socket", str(socket_path)] if socket_path is not None else ["--bind", HOST, "--port", str(port)]
    )
    stderr_path = directory / f"runlmtp-{port or 'socket'}-{attempt}.stderr"
    environment = child_environment(PYTHONUNBUFFERED="1", **{"LMTP_HOSTNAME": HOSTNAME, **settings})
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(PROJECT_DIR / "manage.py"), "runlmtp", *where],
            cwd=PROJECT_DIR,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    server = LmtpProcess(process, port, socket_path, stderr_path)
    arrived: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump_stdout, args=(process, server.stdout_lines, arrived), daemon=True).start()
    expected = f"LMTP listening on {socket_path if socket_path is not None else f'{HOST}:{port}'}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        try:
            line = arrived.get(timeout=0.1)
        except queue.Empty:
            if process.poll() is not None:
                raise RuntimeError(
                    f"runlmtp exited with {process.returncode}:\n{server.stderr_text()}"
                ) from None
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"runlmtp did not start listening:\n{server.stderr_text()}") from None
            continue
        if expected in line:
            # runlmtp prints its "listening" line before it installs its SIGTERM handler; one full
            # exchange proves the event loop is serving, so a SIGTERM from now on is handled.
            with server.connect() as probe:
                assert probe.command("QUIT") == "221 2.0.0 Bye"
            return server


@contextmanager
def running_lmtp(
    directory: Path, *, socket_path: Path | None = None, **settings: str
) -> Iterator[LmtpProcess]:
    """Run ``manage.py runlmtp`` for the duration of the block; it must exit 0 on SIGTERM.

    A test that ends the process itself (SIGKILL, its own SIGTERM) is not checked again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # a free port can be taken by someone else before the child binds it
        try:
            server = _start(directory, socket_path, settings, attempt)
            break
        except RuntimeError as error:
            if "cannot listen" not in str(error) or attempt == 2:
                raise
    stopped_by_test = False
    try:
        yield server
        stopped_by_test = server.process.poll() is not None
    except BaseException:
        print(f"--- runlmtp stderr (last 8000 characters) ---\n{server.stderr_text()[-8000:]}")
        raise
    finally:
        code = server.terminate() if server.process.poll() is None else server.process.returncode
    if not stopped_by_test:
        assert code == 0, f"runlmtp exited with {code} on SIGTERM:\n{server.stderr_text()}"


@pytest.fixture(name="lmtp_server")
def lmtp_server_fixture(tmp_path: Path, transactional_db) -> Iterator[LmtpProcess]:
    """``lmtp_server``: one runlmtp with the default settings, for one test.

    Test modules import ``lmtp_server_fixture`` to make it available."""
    with running_lmtp(tmp_path / "lmtp") as server:
        yield server


# --- A tiny raw LMTP client -------------------------------------------------------------------


class RawLmtp:
    """Bytes over a socket, reading replies line by line so a test sees every line the server sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        """One reply line without its CRLF; raises EOFError if the server closed first."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; partial line {bytes(self.buffer)!r}")
            self.buffer += data
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

    def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes; fails if it is still open after the timeout."""
        try:
            while data := self.sock.recv(65536):
                self.buffer += data
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open; it sent {bytes(self.buffer)!r}"
            ) from None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data
