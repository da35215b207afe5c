"""Load generators: client loops run in worker processes, so the bench's GIL never caps a figure.

Every worker gets a :class:`Task` with a shared wall-clock window; it waits for the start,
works until the end, and counts only work finished inside the window. The bench process
samples the server's CPU at the window's edges meanwhile (see ``scenarios.measure``).
"""

import itertools
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.pool import AsyncResult
from pathlib import Path

from bench.clients import Lmtp, Pop3, ProtocolError, tls_context

ERROR_SAMPLES = 5
ERROR_PAUSE_SECONDS = 0.05


@dataclass(frozen=True)
class Task:
    port: int
    users: tuple[str, ...]
    password: str
    start_at: float  # time.time() of the window's start, shared by all workers
    end_at: float
    cafile: str = ""  # TLS (implicit) when set
    message: bytes = b""  # LMTP only
    sender: str = ""
    # Fleet only: per user, the (size, CRC-32) of its messages, which every RETR is checked against.
    expected: dict[str, frozenset[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class Tally:
    """What one worker (or, merged, all of them) finished inside the window."""

    operations: int = 0  # POP3 sessions, logins, or LMTP deliveries
    messages: int = 0
    octets: int = 0
    latencies: list[float] = field(default_factory=list)
    retr_latencies: list[float] = field(default_factory=list)  # fleet: each RETR, command to last byte
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    late_start_seconds: float = 0.0

    def error(self, error: Exception) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{type(error).__name__}: {error}")
        time.sleep(ERROR_PAUSE_SECONDS)  # do not spin on a refusing server

    def merge(self, other: "Tally") -> None:
        self.operations += other.operations
        self.messages += other.messages
        self.octets += other.octets
        self.latencies += other.latencies
        self.retr_latencies += other.retr_latencies
        self.errors += other.errors
        self.error_samples += other.error_samples[: ERROR_SAMPLES - len(self.error_samples)]
        self.late_start_seconds = max(self.late_start_seconds, other.late_start_seconds)


CLIENT_ERRORS = (ProtocolError, OSError, EOFError)


def _wait_for_start(task: Task, tally: Tally) -> None:
    delay = task.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    tally.late_start_seconds = max(0.0, -delay)


def retr_worker(task: Task) -> Tally:
    """Round-robin over the task's mailboxes: connect, log in, STAT, RETR every message, QUIT."""
    tally = Tally()
    context = tls_context(Path(task.cafile)) if task.cafile else None
    _wait_for_start(task, tally)
    for user in itertools.cycle(task.users):
        if time.time() >= task.end_at:
            break
        try:
            started = time.perf_counter()
            client = Pop3.connect(task.port, context)
            client.login(user, task.password)
            tally.latencies.append(time.perf_counter() - started)
            count, _ = client.stat()
            for number in range(1, count + 1):
                octets = client.retr(number)
                if time.time() > task.end_at:
                    break
                tally.messages += 1
                tally.octets += octets
            else:
                tally.operations += 1
            client.quit()
        except CLIENT_ERRORS as error:
            tally.error(error)
    return tally


def fleet_worker(task: Task) -> Tally:
    """Round-robin over the task's mailboxes: log in, RETR every message and check its bytes
    against ``task.expected``, QUIT without deleting. Latencies: login, and each RETR."""
    tally = Tally()
    context = tls_context(Path(task.cafile)) if task.cafile else None
    _wait_for_start(task, tally)
    for user in itertools.cycle(task.users):
        if time.time() >= task.end_at:
            break
        try:
            started = time.perf_counter()
            client = Pop3.connect(task.port, context)
            client.login(user, task.password)
            tally.latencies.append(time.perf_counter() - started)
            count, _ = client.stat()
            for number in range(1, count + 1):
                asked = time.perf_counter()
                content = client.retr_content(number)
                took = time.perf_counter() - asked
                if (len(content), zlib.crc32(content)) not in task.expected[user]:
                    raise ProtocolError(f"{user} message {number}: {len(content)} bytes, not as stored")
                if time.time() > task.end_at:
                    break
                tally.messages += 1
                tally.octets += len(content)
                tally.retr_latencies.append(took)
            else:
                tally.operations += 1
            client.quit()
        except CLIENT_ERRORS as error:
            tally.error(error)
    return tally


def login_worker(task: Task) -> Tally:
    """Log in and QUIT in a loop; the latency is from connect to the reply to PASS."""
    tally = Tally()
    context = tls_context(Path(task.cafile)) if task.cafile else None
    _wait_for_start(task, tally)
    for user in itertools.cycle(task.users):
        if time.time() >= task.end_at:
            break
        try:
            started = time.perf_counter()
            client = Pop3.connect(task.port, context)
            client.login(user, task.password)
            latency = time.perf_counter() - started
            client.quit()
        except CLIENT_ERRORS as error:
            tally.error(error)
            continue
        if time.time() <= task.end_at:
            tally.operations += 1
            tally.latencies.append(latency)
    return tally


def lmtp_worker(task: Task) -> Tally:
    """One LMTP connection delivering the task's message to its first user, back to back."""
    tally = Tally()
    _wait_for_start(task, tally)
    client = Lmtp.connect(task.port)
    while time.time() < task.end_at:
        try:
            started = time.perf_counter()
            client.deliver(task.sender, task.users[0], task.message)
            latency = time.perf_counter() - started
        except CLIENT_ERRORS as error:
            tally.error(error)
            client.close()
            client = Lmtp.connect(task.port)
            continue
        if time.time() <= task.end_at:
            tally.operations += 1
            tally.messages += 1
            tally.octets += len(task.message)
            tally.latencies.append(latency)
    client.quit()
    return tally


class Workers:
    """Spawned worker processes, started once and reused by every timed scenario.

    Spawned rather than forked: the bench process holds threads and many sockets. Starting
    them once keeps process start-up out of every scenario's window.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = get_context("spawn").Pool(count)

    def start(self, worker: Callable[[Task], Tally], tasks: list[Task]) -> list[AsyncResult]:
        if len(tasks) > self.count:
            raise ValueError(f"{len(tasks)} tasks for {self.count} workers")
        return [self._pool.apply_async(worker, (task,)) for task in tasks]

    @staticmethod
    def collect(pending: list[AsyncResult]) -> Tally:
        total = Tally()
        for result in pending:
            total.merge(result.get())
        return total

    def close(self) -> None:
        self._pool.close()
        self._pool.join()
