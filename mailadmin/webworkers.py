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
import time
from collections import deque
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
# How long runweb waits before accepting again after failing to (out of descriptors, say).
ACCEPT_RETRY_SECONDS = 0.1
DESCRIPTOR_SIZE = 4  # a C int, as SCM_RIGHTS carries descriptors
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
    SIGINT, passed on to each once ``listener`` is closed), 1 when one ended by itself, after
    the others have been stopped, so that a supervisor restarts the service whole."""
    channels: list[socket.socket] = []
    dispatcher = Dispatcher(listener, channels)
    supervisor = _Supervisor(dispatcher)
    previous = {signum: signal.signal(signum, supervisor.forward) for signum in STOP_SIGNALS}
    ready, ready_writer = os.pipe()
    environment = {**os.environ, READY_FD_VARIABLE: str(ready_writer)}
    try:
        for _ in range(workers):
            ours, theirs = channel_pair()
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
        return supervisor.wait()
    finally:
        os.close(ready)
        dispatcher.stop_accepting()
        supervisor.stop()
        for channel in channels:
            channel.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """runweb's end and a worker's of the channel that carries connections to the worker.

    runweb's end is non-blocking and sends into the smallest buffer the kernel allows: a worker
    that stops taking connections (stopped, or stuck) holds only the few already on their way,
    and the rest go to the others.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # raised to the kernel's minimum
    ours.setblocking(False)
    return ours, theirs


class Dispatcher:
    """``runweb``'s accept loop: each new connection goes to the next worker in turn.

    A worker that cannot take one now (its channel full, or it has ended) is passed over for the
    next. When none can, the connections accepted wait here until a channel has room, and no
    more are accepted meanwhile: the kernel's queue holds the rest.
    """

    def __init__(self, listener: socket.socket, channels: list[socket.socket]) -> None:
        self.listener = listener
        self.channels = channels
        self.next = 0
        self.waiting: deque[socket.socket] = deque()

    def serve(self, seconds: float) -> None:
        """Wait up to ``seconds`` for connections or room for them, and hand over what waits."""
        try:
            if self.waiting:  # room in a channel
                _, ready, _ = select.select([], self.channels, [], seconds)
            else:  # a new connection
                ready, _, _ = select.select([self.listener], [], [], seconds)
        except (OSError, ValueError):
            if self.listener.fileno() == -1:  # closed by a stop signal meanwhile
                return
            raise
        if ready:
            self.accept_waiting()
            self.hand_over_waiting()

    def accept_waiting(self) -> None:
        while len(self.waiting) < ACCEPT_BATCH:
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, say: the kernel keeps the rest queued
                if self.listener.fileno() == -1:  # closed by a stop signal meanwhile
                    return
                sys.stderr.write(f"runweb cannot accept a connection: {error}\n")
                time.sleep(ACCEPT_RETRY_SECONDS)
                return
            self.waiting.append(connection)

    def hand_over_waiting(self) -> None:
        while self.waiting and self.hand_over(self.waiting[0]):
            self.waiting.popleft().close()  # the worker has its own copy

    def hand_over(self, connection: socket.socket) -> bool:
        """Pass ``connection`` to the next worker that can take it; whether one did."""
        for _ in range(len(self.channels)):
            channel = self.channels[self.next]
            self.next = (self.next + 1) % len(self.channels)
            try:
                socket.send_fds(channel, [b"c"], [connection.fileno()])
            except BlockingIOError:
                continue
            except OSError as error:  # the worker has ended (the supervisor sees to that), or worse
                if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
                    sys.stderr.write(f"runweb cannot hand a connection to a worker: {error}\n")
                continue
            return True
        return False

    def close_port(self) -> None:
        """Close the port: clients still queued on it are refused. Safe in a signal handler,
        which may run in the middle of a hand-over (``waiting`` is left to the main flow)."""
        self.listener.close()

    def stop_accepting(self) -> None:
        """Close the port and the connections not yet handed over."""
        self.close_port()
        while self.waiting:
            self.waiting.popleft().close()


def serve_handed_connections(server, reactor) -> None:
    """In a worker: serve, with daphne's HTTP and websocket protocol, the connections ``runweb``
    hands over on the channels its ``handoff:fileno=N`` endpoints name. Called with daphne's
    ``Server`` before it runs."""
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
    """The worker's end of a channel: each message carries one accepted connection.

    When the channel fails or runweb closes it, the worker stops: a worker that no longer gets
    connections must not go on looking alive to its supervisor.
    """

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
                data, ancillary, flags, _ = self.channel.recvmsg(
                    1, socket.CMSG_SPACE(DESCRIPTOR_SIZE), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return None
            if not data:
                return CONNECTION_DONE
            if flags & socket.MSG_CTRUNC:
                logger.error("a connection from runweb was lost: this worker is out of descriptors")
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    self._adopt(int.from_bytes(payload[:DESCRIPTOR_SIZE], sys.byteorder, signed=True))
        return None

    def _adopt(self, descriptor: int) -> None:
        with socket.socket(fileno=descriptor) as connection:  # closed here: Twisted takes a copy
            try:
                self.reactor.adoptStreamConnection(connection.fileno(), connection.family, self.factory)
            except OSError as error:  # the client has already gone, or this worker is out of descriptors
                logger.warning("cannot serve a connection from runweb: %s", error)

    def connectionLost(self, reason) -> None:  # noqa: N802 (Twisted's name)
        self.channel.close()
        if self.reactor.running:
            logger.error("the channel from runweb closed (%s); stopping", reason.getErrorMessage())
            self.reactor.stop()


def announce_ready() -> None:
    """In a worker: say it serves, once its reactor runs (daphne has loaded the application and
    taken up its channel from runweb by then)."""
    descriptor = os.environ.pop(READY_FD_VARIABLE, None)
    if descriptor is None:
        return
    from twisted.internet import reactor

    def ready() -> None:
        os.write(int(descriptor), b"!")
        os.close(int(descriptor))

    reactor.callWhenRunning(ready)


class _Supervisor:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.children: list[subprocess.Popen] = []
        self.stopping = False

    def forward(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.dispatcher.close_port()
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
            self.dispatcher.serve(POLL_SECONDS)
        self.stop()
        stopped = (0, -signal.SIGTERM, -signal.SIGINT)
        return 0 if all(child.returncode in stopped for child in self.children) else 1

    def _ended(self) -> subprocess.Popen | None:
        return next((child for child in self.children if child.poll() is not None), None)

    def stop(self) -> None:
        stop_children(self.children, STOP_GRACE_SECONDS)
