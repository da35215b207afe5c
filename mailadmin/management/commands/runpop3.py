"""``runpop3``: the POP3 (plain + STLS) and POP3S listeners over the mail store.

Wiring only: options and settings in, a pop3.server.Pop3Server with the ORM authenticator and
session recorder out, signals hooked up, ``asyncio.run``. The configuration objects take their
values from settings here and nowhere else: settings hold the only defaults.
"""

import asyncio
import resource
import signal
import socket

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from mailadmin import checks
from mailadmin.executors import BoundedExecutor, keep_connections_open
from mailadmin.hosting import argon2hasher
from mailadmin.pop3d import feed
from mailadmin.pop3d.authenticator import AuthPolicy, Pop3Authenticator
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.registry import Pop3Monitor, node_name
from mailadmin.prefork import run_workers, unpin_this_thread, worker_count_argument
from pop3.server import Pop3Server, ServerConfig, listening_socket
from pop3.session import Timeouts

SHUTDOWN_GRACE_SECONDS = 10.0
EXIT_LOCKS_LOST = 1
TEXT_LOCKS_LOST = "runpop3: stopped: its maildrop leases could not be renewed within POP3_LEASE_TTL"


def auth_policy() -> AuthPolicy:
    return AuthPolicy(
        cache_ttl_seconds=settings.POP3_AUTH_CACHE_TTL,
        failure_delay=settings.POP3_AUTH_FAILURE_DELAY,
        penalty_max=settings.POP3_AUTH_PENALTY_MAX,
        penalty_window_seconds=settings.POP3_AUTH_PENALTY_WINDOW,
        login_delay_seconds=settings.POP3_LOGIN_DELAY,
    )


def session_publisher() -> feed.SessionPublisher | None:
    """Live session notices go out only through a layer the web processes share (Redis)."""
    if not feed.layer_crosses_processes():
        return None
    return feed.SessionPublisher(get_channel_layer())


# Descriptors a runpop3 process needs besides its clients' sockets: the listeners, log and TLS
# files, the SQLite lock file, a few in passing; plus one database connection per DB thread.
RESERVED_DESCRIPTORS = 64


def client_descriptor_room() -> int:
    """How many client connections the descriptor limit leaves room for.

    The soft limit is first raised to the hard one (1,024 is a common soft limit, far below the
    10,000 connections runpop3 accepts by default): a connection refused at the cap is cheap,
    one that finds no descriptor fails the database and log writes of every session as well.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, settings.POP3_MAX_CONNECTIONS * 2)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(1, soft - RESERVED_DESCRIPTORS - settings.POP3_DB_THREADS)


def server_config(
    *, bind: str, port: int, tls_port: int, certfile: str, keyfile: str, max_connections: int
) -> ServerConfig:
    return ServerConfig(
        host=bind,
        port=port or None,
        tls_port=tls_port or None,
        certfile=certfile,
        keyfile=keyfile,
        trusted_networks=settings.POP3_TRUSTED_NETWORKS,
        max_connections=max_connections,
        max_connections_per_ip=min(settings.POP3_MAX_CONNECTIONS_PER_IP, max_connections),
        tls_handshake_timeout=settings.POP3_TLS_HANDSHAKE_TIMEOUT,
        timeouts=Timeouts(login=settings.POP3_LOGIN_TIMEOUT, idle=settings.POP3_IDLE_TIMEOUT),
        login_delay_seconds=settings.POP3_LOGIN_DELAY,
        greeting=settings.POP3_GREETING,
    )


class Command(BaseCommand):
    help = "Serve POP3 (with STLS) and POP3S from the mail store until SIGTERM or Ctrl-C."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=settings.POP3_BIND, help="Address to listen on (POP3_BIND).")
        parser.add_argument(
            "--port",
            type=int,
            default=settings.POP3_PORT,
            help="Plain POP3 + STLS port; 0 disables (POP3_PORT).",
        )
        parser.add_argument(
            "--tls-port",
            type=int,
            default=settings.POP3S_PORT,
            help="Implicit-TLS port; 0 disables (POP3S_PORT).",
        )
        parser.add_argument("--certfile", default=settings.POP3_TLS_CERTFILE, help="PEM certificate chain.")
        parser.add_argument("--keyfile", default=settings.POP3_TLS_KEYFILE, help="PEM private key.")
        parser.add_argument(
            "--workers",
            type=worker_count_argument,
            default=settings.POP3_WORKERS,
            help="Processes serving the listeners, or 'auto': one per usable CPU (POP3_WORKERS).",
        )

    def _connection_cap(self) -> int:
        room = client_descriptor_room()
        if settings.POP3_MAX_CONNECTIONS <= room:
            return settings.POP3_MAX_CONNECTIONS
        self.stderr.write(
            f"POP3_MAX_CONNECTIONS is {settings.POP3_MAX_CONNECTIONS}, but the open-files limit leaves "
            f"room for {room} clients: serving at most {room} (raise ulimit -n, LimitNOFILE= in systemd)"
        )
        return room

    def handle(
        self, *args, bind: str, port: int, tls_port: int, certfile: str, keyfile: str, workers: int, **options
    ):
        # The POP3 set-up's own checks (TLS files readable, the channel layer), which other
        # commands skip: see mailadmin.checks.
        self.check(tags=[checks.POP3_TAG], include_deployment_checks=True)
        if bool(certfile) != bool(keyfile):
            raise CommandError("give both --certfile and --keyfile, or neither")
        if tls_port and not certfile:
            tls_port = 0
            self.stderr.write("no certificate configured: POP3S disabled and STLS not offered")
        config = server_config(
            bind=bind,
            port=port,
            tls_port=tls_port,
            certfile=certfile,
            keyfile=keyfile,
            max_connections=self._connection_cap(),
        )
        if config.port is None and config.tls_port is None:
            raise CommandError("both listeners are disabled")
        if workers < 1:
            raise CommandError("--workers must be at least 1")
        sockets: dict[str, socket.socket] = {}
        try:
            for kind, number in (("plain", config.port), ("tls", config.tls_port)):
                if number is not None:
                    sockets[kind] = listening_socket(bind, number)
        except OSError as error:
            for listener in sockets.values():
                listener.close()
            raise CommandError(f"cannot listen: {error}") from None
        try:
            if workers == 1:
                self._serve_until_stopped(config, sockets, announce=True)
                return

            def started() -> None:
                for kind, listener in sockets.items():
                    self._announce(f"runpop3 ({workers} workers)", kind, listener.getsockname())
                    # Only the workers serve it: once they have closed theirs at SIGTERM, a
                    # client is refused rather than left in a backlog nobody accepts from.
                    listener.close()

            if run_workers(
                workers,
                lambda: self._serve_until_stopped(config, sockets, announce=False),
                started,
                pin_to_cpus=settings.DAEMON_PIN_WORKERS,
            ):
                raise CommandError("a worker failed")
        finally:
            for listener in sockets.values():
                listener.close()

    def _announce(self, who: str, kind: str, address: tuple) -> None:
        self.stdout.write(
            f"{who}: {'POP3S' if kind == 'tls' else 'POP3'} listening on {address[0]}:{address[1]}"
        )
        self.stdout.flush()

    def _serve_until_stopped(
        self, config: ServerConfig, sockets: dict[str, socket.socket], announce: bool
    ) -> None:
        """Serve until SIGTERM; exit non-zero if the monitor gave up on the maildrop leases."""
        if not asyncio.run(self._serve(config, sockets, announce)):
            self.stderr.write(TEXT_LOCKS_LOST)
            raise SystemExit(EXIT_LOCKS_LOST)

    async def _serve(self, config: ServerConfig, sockets: dict[str, socket.socket], announce: bool) -> bool:
        """Serve until SIGTERM (True) or until the monitor gives up (False)."""
        keep_connections_open(settings.DAEMON_DB_CONN_MAX_AGE)
        node = node_name()
        database = BoundedExecutor(settings.POP3_DB_THREADS, "pop3-db")
        hashing = BoundedExecutor(settings.POP3_AUTH_THREADS, "pop3-auth", initializer=_start_hashing_thread)
        leases = LeaseKeeper(database, node=node, ttl_seconds=settings.POP3_LEASE_TTL)
        stop = asyncio.Event()
        monitor = Pop3Monitor(
            database,
            leases,
            node=node,
            interval=settings.POP3_MONITOR_INTERVAL,
            on_give_up=stop.set,
            publisher=session_publisher(),
        )
        authenticator = Pop3Authenticator(auth_policy(), database=database, hashing=hashing, leases=leases)
        server = Pop3Server(config, authenticator, monitor.recorder)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
        await server.start(sockets)
        monitor.start()
        if announce:
            for kind, address in server.addresses.items():
                self._announce(f"runpop3 {node}", kind, address)
        await stop.wait()
        await server.shutdown(SHUTDOWN_GRACE_SECONDS)
        await authenticator.settle()
        await monitor.stop()
        hashing.shutdown()
        if monitor.gave_up:
            # The database stopped answering: the leases lapse by themselves, and no thread
            # stuck in a query is waited for (PostgreSQL's keepalives end it in time).
            database.shutdown(wait=False)
            return False
        await leases.release_all()
        database.shutdown()
        return True


def _start_hashing_thread() -> None:
    """A password-hashing thread: argon2's lanes may use every CPU (not only its worker's), and
    its argon2 memory is kept between checks."""
    unpin_this_thread()
    argon2hasher.keep_memory_in_this_thread()
