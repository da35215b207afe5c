"""``runweb``: daphne in ``WEB_WORKERS`` processes sharing one listening socket.

One daphne process serves the console and the API on one core: its Twisted loop and Django's
request threads share one interpreter lock. ``runweb`` binds the port, starts ``WEB_WORKERS``
daphne processes that each accept on it (the kernel hands every new connection to one of
them) and stays behind as a small supervisor, as runpop3 and runlmtp do with their workers.
Nothing the web workers share lives in memory: signed-in sessions, the live page's rows and
the API's failure counts are rows (or Redis, with ``REDIS_URL``).

The workers are new interpreters, not forks of this one: importing daphne installs its Twisted
reactor on an event loop, and a forked loop would share its epoll instance with its siblings.
Each says it is serving by writing a byte to a pipe (``READY_FD_VARIABLE`` names its end) once
its reactor runs; ``started()`` is called when every worker has, so "listening" means served.
"""

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from mailadmin.prefork import STOP_SIGNALS, die_with_parent, stop_children

APPLICATION = "mailadmin.asgi:application"
READY_FD_VARIABLE = "MAILADMIN_WEB_READY_FD"
STOP_GRACE_SECONDS = 10
POLL_SECONDS = 0.2


def bind(address: str, port: int) -> socket.socket:
    """An IPv4 listening socket the workers inherit. (Twisted's ``fd:`` endpoint, which daphne
    adopts it through, takes IPv4 sockets only; put a proxy in front for IPv6.)"""
    listener = socket.create_server((address, port), family=socket.AF_INET, backlog=socket.SOMAXCONN)
    listener.set_inheritable(True)
    return listener


def worker_command(listener: socket.socket, daphne_args: list[str]) -> list[str]:
    """A web worker: ``python -m mailadmin.webworker``, accepting on the inherited socket."""
    endpoint = f"fd:fileno={listener.fileno()}"
    return [sys.executable, "-m", "mailadmin.webworker", "-e", endpoint, *daphne_args, APPLICATION]


def run(listener: socket.socket, workers: int, daphne_args: list[str], started: Callable[[], None]) -> int:
    """Start ``workers`` daphne processes on ``listener``, call ``started()`` once all of them
    serve, and wait until they end: 0 when they were stopped (SIGTERM, SIGINT, passed on to
    each), 1 when one ended by itself, after the others have been stopped, so that a supervisor
    restarts the service whole."""
    command = worker_command(listener, daphne_args)
    supervisor = _Supervisor()
    previous = {signum: signal.signal(signum, supervisor.forward) for signum in STOP_SIGNALS}
    ready, ready_writer = os.pipe()
    environment = {**os.environ, READY_FD_VARIABLE: str(ready_writer)}
    try:
        for _ in range(workers):
            supervisor.children.append(
                subprocess.Popen(
                    command,
                    env=environment,
                    pass_fds=[listener.fileno(), ready_writer],
                    preexec_fn=lambda: die_with_parent(signal.SIGTERM),
                )
            )
        listener.close()  # the workers hold it now
        os.close(ready_writer)
        if supervisor.await_ready(ready, workers):
            started()
        return supervisor.wait()
    finally:
        os.close(ready)
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def announce_ready() -> None:
    """In a worker: say it serves, once its reactor runs (daphne has adopted the socket and
    loaded the application by then)."""
    descriptor = os.environ.pop(READY_FD_VARIABLE, None)
    if descriptor is None:
        return
    from twisted.internet import reactor

    def ready() -> None:
        os.write(int(descriptor), b"!")
        os.close(int(descriptor))

    reactor.callWhenRunning(ready)


class _Supervisor:
    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self.stopping = False

    def forward(self, signum: int, frame: object) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def await_ready(self, ready: int, workers: int) -> bool:
        """Whether every worker said it serves before any ended or a stop was asked for."""
        said = 0
        while said < workers and not self.stopping and self._ended() is None:
            readable, _, _ = select.select([ready], [], [], POLL_SECONDS)
            if readable:
                said += len(os.read(ready, workers))
        return said == workers

    def wait(self) -> int:
        while not self.stopping:
            ended = self._ended()
            if ended is not None:
                sys.stderr.write(
                    f"web worker {ended.pid} ended unexpectedly (exit status {ended.returncode}); "
                    "stopping the others\n"
                )
                return 1
            time.sleep(POLL_SECONDS)
        self.stop()
        stopped = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(child.returncode in stopped for child in self.children) else 1

    def _ended(self) -> subprocess.Popen | None:
        return next((child for child in self.children if child.poll() is not None), None)

    def stop(self) -> None:
        stop_children(self.children, STOP_GRACE_SECONDS)
