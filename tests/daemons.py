"""Real ``manage.py`` server children (runpop3, runlmtp) for end-to-end tests: the common part.

``start_daemon(cls, arguments, ...)`` spawns ``manage.py <cls.command> <arguments>`` against the
test database (see ``tests.conftest.child_environment``) with its stderr in a file, collects its
stdout lines in a background thread, and waits until every expected readiness text (its
"listening" lines) has appeared. ``running_daemon(directory, start)`` runs one for the duration
of a block, retrying when a free port was taken before the child bound it, and on exit sends
SIGTERM and checks that the process exits 0.

``DaemonProcess`` is the child as tests see it (pid, stderr, memory figures, kill, terminate);
the server-specific fixture modules subclass it with their ports and clients. ``RawClient`` is
the socket end of their raw protocol clients.
"""

import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from tests.conftest import PROJECT_DIR, child_environment

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class DaemonProcess:
    """One ``manage.py`` server child: its process, output and memory figures."""

    command: ClassVar[str]  # the manage.py command, e.g. "runpop3"

    process: subprocess.Popen
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list, kw_only=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def label(self) -> str:
        """How the child is named in the stderr dump of a failing test."""
        return self.command

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def workers(self) -> list[int]:
        """The worker processes the server forked (``--workers``); none when it serves alone."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return [int(child) for child in children.split()]

    def memory_kib(self, key: str) -> int:
        """A ``/proc/PID/status`` figure in KiB: VmRSS (now) or VmHWM (peak).

        Only of a server serving alone (``*_WORKERS=1``): a supervisor's figures would say
        nothing about its workers, and a test bounding them could not fail.
        """
        assert self.workers() == [], "memory figures need a server without workers (*_WORKERS=1)"
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise KeyError(key)

    def reset_peak_memory(self) -> int:
        """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); return that RSS in KiB."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.memory_kib("VmHWM")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


D = TypeVar("D", bound=DaemonProcess)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _pump_stdout(process: subprocess.Popen, lines: list[str], arrived: "queue.Queue[str]") -> None:
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip("\n")
        lines.append(line)
        arrived.put(line)


def start_daemon(
    cls: type[D],
    arguments: Sequence[str],
    *,
    stderr_path: Path,
    environment: Mapping[str, str],
    ready: Collection[str],
    **fields: Any,
) -> D:
    """Spawn ``manage.py <cls.command> <arguments>`` and wait for its readiness lines.

    ``environment`` is added to the test database's child environment; ``ready`` holds texts
    that must each appear in some stdout line (in any order); ``fields`` are the subclass's own
    dataclass fields. Raises RuntimeError with the child's stderr if it exits first or is not
    ready within ``STARTUP_TIMEOUT`` seconds (then it is killed).
    """
    command = [sys.executable, str(PROJECT_DIR / "manage.py"), cls.command, *arguments]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=child_environment(PYTHONUNBUFFERED="1", **environment),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    daemon = cls(process=process, stderr_path=stderr_path, **fields)
    arrived: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump_stdout, args=(process, daemon.stdout_lines, arrived), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    waiting = set(ready)
    while waiting:
        try:
            line = arrived.get(timeout=0.1)
        except queue.Empty:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{cls.command} exited with {process.returncode}:\n{daemon.stderr_text()}"
                ) from None
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"{cls.command} did not start listening:\n{daemon.stderr_text()}"
                ) from None
            continue
        waiting = {text for text in waiting if text not in line}
    return daemon


@contextmanager
def running_daemon(directory: Path, start: Callable[[int], D]) -> Iterator[D]:
    """Run the child ``start(attempt)`` returns for the block; it must exit 0 on SIGTERM.

    ``directory`` (for its stderr files) is made first. ``start`` is tried up to three times
    while it fails with "cannot listen" (a free port can be taken by someone else before the
    child binds it). A test that ends the process itself (SIGKILL, its own SIGTERM) is not
    checked again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            daemon = start(attempt)
            break
        except RuntimeError as error:
            if "cannot listen" not in str(error) or attempt == 2:
                raise
    stopped_by_test = False
    try:
        yield daemon
        stopped_by_test = daemon.process.poll() is not None
    except BaseException:
        print(f"--- {daemon.label()} stderr (last 8000 characters) ---\n{daemon.stderr_text()[-8000:]}")
        raise
    finally:
        code = daemon.terminate() if daemon.process.poll() is None else daemon.process.returncode
    if not stopped_by_test:
        assert code == 0, f"{daemon.command} exited with {code} on SIGTERM:\n{daemon.stderr_text()}"


class RawClient:
    """Bytes over a socket: what has arrived and is not parsed yet waits in ``buffer``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.received = 0  # every byte read from the server, greeting included

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, size: int = 65536) -> bool:
        """Read once into the buffer; False when the server has closed the connection."""
        data = self.sock.recv(size)
        if not data:
            return False
        self.received += len(data)
        self.buffer += data
        return True

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
