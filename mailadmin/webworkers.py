"""``runweb``: daphne in ``WEB_WORKERS`` processes behind one listening socket.

One daphne process serves the console and the API on one core: its Twisted loop and Django's
request threads share one interpreter lock. ``runweb`` binds the port, starts ``WEB_WORKERS``
daphne processes and stays behind as a small supervisor, as runpop3 and runlmtp do with their
workers. Nothing the web workers share lives in memory: signed-in sessions, the live page's
rows and the API's failure counts are rows (or Redis, with ``REDIS_URL``).

``runweb`` accepts the connections itself and hands each to the next worker in turn, over a
Unix socket of its own (``SCM_RIGHTS``). Left to the kernel, whichever worker woke first took
every connection waiting: four keep-alive clients starting together all landed on one worker in
about one run of six, and that worker's core set the rate (an API ``GET`` at 360 a second
against 650-710 in the same minute when both workers had some).

The workers are new interpreters, not forks of this one: importing daphne installs its Twisted
reactor on an event loop, and a forked loop would share its epoll instance with its siblings.
Each says it is serving by writing a byte to a pipe (``READY_FD_VARIABLE`` names its end) once
its reactor runs; ``started()`` is called when every worker has, so "listening" means served.
"""

import logging
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from zope.interface import implementer

from mailadmin.prefork import STOP_SIGNALS, die_with_parent, stop_children

logger = logging.getLogger(__name__)

APPLICATION = "mailadmin.asgi:application"
READY_FD_VARIABLE = "MAILADMIN_WEB_READY_FD"
# The daphne endpoint of a worker's channel from runweb: ``handoff:fileno=N``.
HANDOFF_ENDPOINT = "handoff:fileno="
# Connections accepted (runweb) or taken over (a worker) in one go before looking around again.
ACCEPT_BATCH = 64
STOP_GRACE_SECONDS = 10
POLL_SECONDS = 0.2


def bind(address: str, port: int) -> socket.socket:
    """An IPv4 listening socket, on which ``runweb`` accepts for its workers."""
    listener = socket.create_server((address, port), family=socket.AF_INET, backlog=socket.SOMAXCONN)
    listener.setblocking(False)
    return listener


def worker_command(channel: socket.socket, daphne_args: list[str]) -> list[str]:
    """A web worker: ``python -m mailadmin.webworker``, serving what arrives on ``channel``."""
    endpoint = f"{HANDOFF_ENDPOINT}{channel.fileno()}"
    return [sys.executable, "-m", "mailadmin.webworker", "-e", endpoint, *daphne_args, APPLICATION]


def run(listener: socket.socket, workers: int, daphne_args: list[str], started: Callable[[], None]) -> int:
    """Start ``workers`` daphne processes, call ``started()`` once all of them serve, and hand
    them the connections to ``listener`` until they end: 0 when they were stopped (SIGTERM,
    SIGINT, passed on to each), 1 when one ended by itself, after the others have been
    stopped, so that a supervisor restarts the service whole."""
    supervisor = _Supervisor()
    previous = {signum: signal.signal(signum, supervisor.forward) for signum in STOP_SIGNALS}
    ready, ready_writer = os.pipe()
    environment = {**os.environ, READY_FD_VARIABLE: str(ready_writer)}
    channels: list[socket.socket] = []
    try:
        for _ in range(workers):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            channels.append(ours)
            with theirs:
                supervisor.children.append(
                    subprocess.Popen(
                        worker_command(theirs, daphne_args),
                        env=environment,
                        pass_fds=[theirs.fileno(), ready_writer],
                        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
                    )
                )
        os.close(ready_writer)
        if supervisor.await_ready(ready, workers):
            started()
        return supervisor.wait(Dispatcher(listener, channels))
    finally:
        os.close(ready)
        supervisor.stop()
        listener.close()
        for channel in channels:
            channel.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Dispatcher:
    """``runweb``'s accept loop: each new connection goes to the next worker in turn.

    A worker that cannot take one now (its channel full, or it has ended) is passed over for the
    next; when none can, the connection is closed, and the client sees it reset.
    """

    def __init__(self, listener: socket.socket, channels: list[socket.socket]) -> None:
        self.listener = listener
        self.channels = channels
        self.next = 0

    def serve(self, seconds: float) -> None:
        """Wait up to ``seconds`` for connections, and hand over those waiting."""
        readable, _, _ = select.select([self.listener], [], [], seconds)
        if readable:
            self.hand_over_waiting()

    def hand_over_waiting(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as error:  # out of descriptors, say: the kernel keeps the rest queued
                sys.stderr.write(f"runweb cannot accept a connection: {error}\n")
                return
            with connection:
                self.hand_over(connection)

    def hand_over(self, connection: socket.socket) -> bool:
        """Pass ``connection`` to a worker (our copy is closed by the caller); whether one took it."""
        for _ in range(len(self.channels)):
            channel = self.channels[self.next]
            self.next = (self.next + 1) % len(self.channels)
            try:
                socket.send_fds(channel, [b"c"], [connection.fileno()])
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                continue
            return True
        return False


def serve_handed_connections(server, reactor) -> None:
    """In a worker: serve, with daphne's HTTP and websocket protocol, the connections ``runweb``
    hands over on the channels its ``handoff:fileno=N`` endpoints name (daphne itself listens
    on its other endpoints, if any). Called with daphne's ``Server`` before it runs."""
    channels = [int(e[len(HANDOFF_ENDPOINT) :]) for e in server.endpoints if e.startswith(HANDOFF_ENDPOINT)]
    server.endpoints = [e for e in server.endpoints if not e.startswith(HANDOFF_ENDPOINT)]
    announce = server.ready_callable

    def start() -> None:  # daphne calls it once its protocol factory exists, before its reactor runs
        for descriptor in channels:
            reactor.addReader(_HandedConnections(descriptor, server.http_factory, reactor))
            logger.info("Serving the connections runweb hands over on descriptor %d", descriptor)
        if announce:
            announce()

    server.ready_callable = start


@implementer(IReadDescriptor)
class _HandedConnections:
    """The worker's end of a channel: each message carries one accepted connection."""

    def __init__(self, descriptor: int, factory, reactor) -> None:
        self.channel = socket.socket(fileno=descriptor)
        self.channel.setblocking(False)
        self.factory = factory
        self.reactor = reactor

    def fileno(self) -> int:
        return self.channel.fileno()

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's name)
        return "runweb-handoff"

    def doRead(self):  # noqa: N802 (Twisted's name)
        for _ in range(ACCEPT_BATCH):
            try:
                data, descriptors, _, _ = socket.recv_fds(self.channel, 1, 1)
            except BlockingIOError:
                return None
            if not data and not descriptors:  # runweb has gone (its worker follows: die_with_parent)
                return CONNECTION_DONE
            for descriptor in descriptors:
                self._adopt(descriptor)
        return None

    def _adopt(self, descriptor: int) -> None:
        with socket.socket(fileno=descriptor) as connection:  # closed here: Twisted takes a copy
            try:
                self.reactor.adoptStreamConnection(connection.fileno(), connection.family, self.factory)
            except OSError:  # the client left before we got to it
                pass

    def connectionLost(self, reason) -> None:  # noqa: N802 (Twisted's name)
        self.channel.close()


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

    def wait(self, dispatcher: Dispatcher) -> int:
        while not self.stopping:
            ended = self._ended()
            if ended is not None:
                sys.stderr.write(
                    f"web worker {ended.pid} ended unexpectedly (exit status {ended.returncode}); "
                    "stopping the others\n"
                )
                return 1
            dispatcher.serve(POLL_SECONDS)
        self.stop()
        stopped = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(child.returncode in stopped for child in self.children) else 1

    def _ended(self) -> subprocess.Popen | None:
        return next((child for child in self.children if child.poll() is not None), None)

    def stop(self) -> None:
        stop_children(self.children, STOP_GRACE_SECONDS)
