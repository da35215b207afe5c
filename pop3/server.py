"""asyncio I/O for POP3: listeners (plain + STLS, implicit TLS), limits, flow control, shutdown.

The listeners accept connections themselves rather than through ``loop.create_server``, so a
connection counts against the caps from the moment it is accepted: a TLS handshake in progress
is a connection like any other (asyncio's TLS server would show it to no one until it
completed, and 2,000 silent clients of one address cost ~270 KiB each), and running out of
file descriptors pauses accepting with one log line instead of a traceback per attempt.

Each connection gets a :class:`_ClientProtocol`, an ``asyncio.Protocol`` with an explicit input
queue instead of a ``StreamReader``. That matters for STLS: the session refuses the upgrade if
any plaintext is queued behind the STLS line, and ``loop.start_tls`` takes the transport over
before the event loop can deliver more, so no plaintext byte is ever read as if it came over
TLS (CVE-2011-0411 class; a StreamReader would keep such bytes buffered across the upgrade).
"""

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pop3 import protocol
from pop3.mailbox import Authenticator, ConnectionInfo, EndReason, SessionObserver
from pop3.protocol import ResponseCode, err
from pop3.session import ConnectionLost, Session, Timeouts

logger = logging.getLogger(__name__)

# Stop reading from a client that has this much unprocessed input queued (pipelining
# backpressure, checklist G17); resume once the session has taken what is queued.
INPUT_HIGH_WATER = 64 * 1024
# Modern AEAD suites for TLS 1.2; TLS 1.3 suites are fixed by OpenSSL and all fine.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

TEXT_TOO_MANY_CONNECTIONS = "Too many connections, try again later."

LISTEN_BACKLOG = 100
# Connections taken per readiness of a listener, as asyncio's own accept loop does.
ACCEPTS_PER_WAKEUP = 100
# When accept() fails for lack of file descriptors or memory, the listener stops for this long
# (the kernel keeps reporting it readable, so retrying at once would spin).
ACCEPT_PAUSE_SECONDS = 1.0
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def make_tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS 1.2+ with AEAD ciphers, no compression, no renegotiation (RFC 8314 s. 4, RFC 8996)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    # Advertised for ALPN-aware clients; CPython cannot refuse a mismatching client (ALPACA).
    context.set_alpn_protocols(["pop3"])
    context.load_cert_chain(certfile, keyfile)
    return context


@dataclass
class ServerConfig:
    """What the embedding application configures; it owns the defaults (runpop3: Django settings)."""

    host: str
    # None disables a listener; 0 binds an ephemeral port (see Pop3Server.addresses).
    port: int | None  # plain, with STLS when a certificate is configured
    tls_port: int | None  # implicit TLS; needs a certificate
    max_connections: int
    max_connections_per_ip: int
    tls_handshake_timeout: float
    timeouts: Timeouts
    login_delay_seconds: int  # 0: no LOGIN-DELAY
    greeting: str
    certfile: str = ""  # none: no STLS, no implicit TLS
    keyfile: str = ""
    trusted_networks: Iterable[str] = ()


class _ClientProtocol(asyncio.Protocol):
    """The SessionIO of one connection."""

    def __init__(self, server: "Pop3Server", implicit_tls: bool) -> None:
        self._server = server
        self._implicit_tls = implicit_tls
        self._input: deque[bytes] = deque()
        self._queued = 0
        self._reading_paused = False
        self._writing_paused = False
        self._closed = False
        self._data_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.info: ConnectionInfo | None = None

    # asyncio.Protocol callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return  # start_tls hands the same protocol a new transport; nothing to redo
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.info = ConnectionInfo(
            peer=(peer[0], peer[1]),
            local=(local[0], local[1]),
            implicit_tls=self._implicit_tls,
            session_id=uuid.uuid4().hex,
        )
        if self._implicit_tls:
            transport.pause_reading()  # the ClientHello is for start_tls to read, not us

    def data_received(self, data: bytes) -> None:
        self._input.append(data)
        self._queued += len(data)
        if self._queued > INPUT_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._data_waiter)

    def eof_received(self) -> bool:
        self._closed = True
        self._wake(self._data_waiter)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake(self._data_waiter)
        self._wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake(self._drain_waiter)

    # SessionIO -------------------------------------------------------------------------------

    async def receive(self) -> bytes:
        while not self._input:
            if self._closed:
                raise ConnectionLost("end of stream")
            self._data_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        data = b"".join(self._input)
        self._input.clear()
        self._queued = 0
        if self._reading_paused and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self._closed or self.transport.is_closing():
            raise ConnectionLost("write after close")
        self.transport.write(data)

    @property
    def writable(self) -> bool:
        return not self._writing_paused and not self._closed

    async def drain(self) -> None:
        while self._writing_paused:
            if self._closed:
                raise ConnectionLost("closed while writing")
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._closed:
            raise ConnectionLost("closed while writing")

    async def start_tls(self) -> tuple[str, str]:
        if self._input:
            raise ConnectionLost("plaintext queued behind STLS")
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                self._server.tls_context,
                server_side=True,
                ssl_handshake_timeout=self._server.config.tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            raise ConnectionLost(f"TLS handshake failed: {error}") from None
        if transport is None:
            raise ConnectionLost("closed during the TLS handshake")
        self.transport = transport
        return self.tls_details()

    def tls_details(self) -> tuple[str, str]:
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return "", ""
        cipher = ssl_object.cipher()
        return ssl_object.version() or "", cipher[0] if cipher else ""

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @staticmethod
    def _wake(waiter: asyncio.Future | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Listener:
    """One listening socket; hands each accepted connection to the server."""

    def __init__(self, server: "Pop3Server", sock: socket.socket, implicit_tls: bool) -> None:
        self._server = server
        self.sock = sock
        self._implicit_tls = implicit_tls
        self._loop = asyncio.get_running_loop()
        self._resume: asyncio.TimerHandle | None = None
        self._starved = False  # accept() is failing; logged once until one succeeds again
        sock.setblocking(False)

    def start(self) -> None:
        self._resume = None
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as error:
                self._pause(error)
                return
            self._starved = False
            conn.setblocking(False)
            self._server._connect(conn, peer[0], self._implicit_tls)

    def _pause(self, error: OSError) -> None:
        if not self._starved:
            reason = "out of file descriptors or memory" if error.errno in OUT_OF_RESOURCES else "failing"
            logger.warning(
                "POP3 accept on %s is %s (%s); pausing new connections for %g s at a time until it recovers",
                _address(self.sock),
                reason,
                error,
                ACCEPT_PAUSE_SECONDS,
            )
        self._starved = True
        self._loop.remove_reader(self.sock.fileno())
        self._resume = self._loop.call_later(ACCEPT_PAUSE_SECONDS, self.start)

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        elif self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Pop3Server:
    """The listeners and every live connection of one process."""

    def __init__(
        self,
        config: ServerConfig,
        authenticator: Authenticator,
        make_observer: Callable[[Session], SessionObserver] | None = None,
    ) -> None:
        self.config = config
        self.authenticator = authenticator
        self._make_observer = make_observer
        self.tls_context: ssl.SSLContext | None = None
        if config.certfile:
            self.tls_context = make_tls_context(config.certfile, config.keyfile)
        self._trusted = [ipaddress.ip_network(net, strict=False) for net in config.trusted_networks]
        self._listeners: dict[str, _Listener] = {}
        # Every accepted connection, by its task; the session once the connection has one (a
        # connection to the implicit-TLS port has none during its handshake).
        self._connections: dict[asyncio.Task, Session | None] = {}
        self._per_ip: dict[str, int] = {}
        self._accepting = True

    @property
    def sessions(self) -> list[Session]:
        return [session for session in self._connections.values() if session is not None]

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet closed, handshakes in progress included."""
        return len(self._connections)

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """Bound addresses by listener kind ("plain", "tls"), useful with port 0 in tests."""
        return {kind: listener.sock.getsockname()[:2] for kind, listener in self._listeners.items()}

    async def start(self, sockets: Mapping[str, socket.socket] | None = None) -> None:
        """Listen on the configured ports, or on sockets already bound and listening.

        ``sockets`` maps a listener kind ("plain", "tls") to its socket: a parent process binds
        them once and every worker process serves the same ones.
        """
        sockets = sockets or {}
        if self.config.tls_port is not None and self.tls_context is None:
            raise ValueError("the implicit-TLS listener needs a certificate and key")
        ports = {"plain": self.config.port, "tls": self.config.tls_port}
        for kind, port in ports.items():
            if port is None:
                continue
            try:
                sock = sockets.get(kind) or listening_socket(self.config.host, port)
            except OSError:
                for listener in self._listeners.values():
                    listener.sock.close()
                raise
            self._listeners[kind] = _Listener(self, sock, implicit_tls=kind == "tls")
        for listener in self._listeners.values():
            listener.start()

    def reload_tls(self) -> None:
        """Load the certificate files again (SIGHUP); new handshakes use them at once."""
        if self.tls_context is not None:
            self.tls_context.load_cert_chain(self.config.certfile, self.config.keyfile)
            logger.info("reloaded TLS certificate from %s", self.config.certfile)

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop accepting, end every session without applying its deletions, wait for them."""
        self._accepting = False
        for listener in self._listeners.values():
            listener.close()
        for task, session in list(self._connections.items()):
            if session is None:
                task.cancel()
            else:
                session.kick(EndReason.SHUTDOWN)
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=grace)

    # Connection bookkeeping ------------------------------------------------------------------

    def _connect(self, conn: socket.socket, host: str, implicit_tls: bool) -> None:
        """A connection just accepted: counted from now, or turned away if over a cap."""
        if not self._accepting or not self._has_room(host):
            _turn_away(conn, implicit_tls)
            return
        self._per_ip[host] = self._per_ip.get(host, 0) + 1
        task = asyncio.get_running_loop().create_task(self._serve(conn, host, implicit_tls))
        self._connections[task] = None

    def _has_room(self, host: str) -> bool:
        if len(self._connections) >= self.config.max_connections:
            return False
        return self._per_ip.get(host, 0) < self.config.max_connections_per_ip

    async def _serve(self, conn: socket.socket, host: str, implicit_tls: bool) -> None:
        task = asyncio.current_task()
        client = _ClientProtocol(self, implicit_tls)
        try:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(lambda: client, conn)
                if implicit_tls:
                    await client.start_tls()
            except (OSError, ConnectionLost):
                return  # gone before a session began: a reset, a failed or timed-out handshake
            session = self._new_session(client)
            self._connections[task] = session
            await session.run()
        finally:
            if client.transport is None:
                conn.close()
            else:
                client.close()
            del self._connections[task]
            self._per_ip[host] -= 1
            if not self._per_ip[host]:
                del self._per_ip[host]

    def _new_session(self, client: _ClientProtocol) -> Session:
        session = Session(
            client,
            self.authenticator,
            policy=self._policy_for(client),
            timeouts=self.config.timeouts,
            greeting=self.config.greeting,
        )
        if self._make_observer is not None:
            session.observer = self._make_observer(session)
        return session

    def _policy_for(self, client: _ClientProtocol) -> protocol.Policy:
        return protocol.Policy(
            tls_active=client.info.implicit_tls,
            stls_available=self.tls_context is not None and not client.info.implicit_tls,
            cleartext_trusted=self.is_trusted(client.info.peer[0]),
            login_delay_seconds=self.config.login_delay_seconds,
        )

    def is_trusted(self, host: str) -> bool:
        """Loopback and configured networks may log in without TLS (RFC 2595 s. 2.2)."""
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return address.is_loopback or any(address in network for network in self._trusted)


def _turn_away(conn: socket.socket, implicit_tls: bool) -> None:
    """Close a connection over a cap: with a -ERR on the plain port, without a word (and
    without a handshake) on the implicit-TLS one."""
    if not implicit_tls:
        try:
            conn.send(err(TEXT_TOO_MANY_CONNECTIONS, ResponseCode.SYS_TEMP))
        except OSError:
            pass
    conn.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (any address when empty) and ``port``.

    Also what a pre-forking parent binds before its workers exist, so that all of them share it.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"
