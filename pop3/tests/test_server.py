"""pop3.server in-process: TLS policy, certificate reload, connection caps, shutdown."""

import asyncio
import errno
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from pop3 import server as server_module
from pop3.mailbox import MemoryAuthenticator, MemoryStore
from pop3.protocol import ok
from pop3.server import TEXT_TOO_MANY_CONNECTIONS, Pop3Server, ServerConfig
from pop3.session import TEXT_SHUTTING_DOWN, Timeouts

GREETING = "POP3 server ready."


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name=name)
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(certfile)
    cert.private_key_pem.write_to_path(keyfile)
    return str(certfile), str(keyfile)


SERVER_DEFAULTS = dict(
    host="127.0.0.1",
    port=0,
    max_connections=100,
    max_connections_per_ip=10,
    tls_handshake_timeout=10.0,
    timeouts=Timeouts(login=180.0, idle=600.0),
    login_delay_seconds=0,
    greeting=GREETING,
)


def serve(test, *, store: MemoryStore | None = None, sockets: dict | None = None, **config):
    """Run ``test(server)`` against a live server on ephemeral loopback ports."""

    async def main():
        authenticator = MemoryAuthenticator({"alice": ("pw", store or MemoryStore())})
        server = Pop3Server(
            ServerConfig(**{**SERVER_DEFAULTS, "tls_port": 0 if config.get("certfile") else None, **config}),
            authenticator,
        )
        await server.start(sockets)
        try:
            return await test(server)
        finally:
            await server.shutdown(grace=2)

    return asyncio.run(main())


def client_context(ca: trustme.CA, **options) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for name, value in options.items():
        setattr(context, name, value)
    return context


async def peer_common_name(server: Pop3Server, context: ssl.SSLContext) -> str:
    host, port = server.addresses["tls"]
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="localhost")
    assert await reader.readline() == ok(GREETING)
    subject = dict(pair[0] for pair in writer.get_extra_info("peercert")["subject"])
    writer.close()
    return subject["commonName"]


def test_tls_below_1_2_is_refused(ca, tmp_path):
    certfile, keyfile = write_cert(ca, tmp_path, "first")
    with pytest.warns(DeprecationWarning):
        old = client_context(ca, minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client really offer TLS 1.1

    async def test(server):
        host, port = server.addresses["tls"]
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection(host, port, ssl=old, server_hostname="localhost")
        return await peer_common_name(server, client_context(ca))

    assert serve(test, certfile=certfile, keyfile=keyfile) == "first"


def test_reload_tls_serves_the_new_certificate_to_new_connections(ca, tmp_path):
    certfile, keyfile = write_cert(ca, tmp_path, "first")

    async def test(server):
        before = await peer_common_name(server, client_context(ca))
        write_cert(ca, tmp_path, "second")
        server.reload_tls()
        return before, await peer_common_name(server, client_context(ca))

    assert serve(test, certfile=certfile, keyfile=keyfile) == ("first", "second")


def test_a_silent_client_is_dropped_after_the_handshake_timeout(ca, tmp_path):
    certfile, keyfile = write_cert(ca, tmp_path, "first")

    async def test(server):
        reader, writer = await asyncio.open_connection(*server.addresses["tls"])
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        return data

    assert serve(test, certfile=certfile, keyfile=keyfile, tls_handshake_timeout=0.3) == b""


def test_connections_beyond_the_caps_are_turned_away():
    async def test(server):
        host, port = server.addresses["plain"]
        kept = [await asyncio.open_connection(host, port) for _ in range(2)]
        for reader, _ in kept:
            assert await reader.readline() == ok(GREETING)
        reader, writer = await asyncio.open_connection(host, port)
        refused = await reader.read()
        writer.close()
        for _, kept_writer in kept:
            kept_writer.close()
        return refused

    expected = f"-ERR [SYS/TEMP] {TEXT_TOO_MANY_CONNECTIONS}\r\n".encode()
    assert serve(test, max_connections=2) == expected
    assert serve(test, max_connections_per_ip=2) == expected


def test_shutdown_ends_sessions_without_applying_deletions():
    store = MemoryStore([("u1", b"Subject: a\r\n\r\none\r\n"), ("u2", b"Subject: b\r\n\r\ntwo\r\n")])

    async def test(server):
        reader, writer = await asyncio.open_connection(*server.addresses["plain"])
        await reader.readline()
        writer.write(b"USER alice\r\nPASS pw\r\nDELE 1\r\n")
        replies = [await reader.readline() for _ in range(3)]
        await server.shutdown(grace=2)
        replies.append(await reader.read())
        writer.close()
        return replies

    replies = serve(test, store=store)
    assert replies == [
        b"+OK\r\n",
        b"+OK Logged in.\r\n",
        b"+OK Marked to be deleted.\r\n",
        f"-ERR [SYS/TEMP] {TEXT_SHUTTING_DOWN}\r\n".encode(),
    ]
    assert [uidl for uidl, _ in store.messages] == ["u1", "u2"]
    assert store.lock_owner is None


async def until(condition, turns: int = 1000) -> None:
    """Let the event loop run until ``condition()`` holds; fail after ``turns`` turns."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail(f"not reached in {turns} turns of the event loop")


def test_tls_handshakes_never_started_count_against_the_per_address_cap(ca, tmp_path):
    certfile, keyfile = write_cert(ca, tmp_path, "first")

    async def test(server):
        host, port = server.addresses["tls"]
        silent = [await asyncio.open_connection(host, port) for _ in range(3)]
        await until(lambda: server.connection_count == 3)
        refused = 0
        for _ in range(4):
            reader, writer = await asyncio.open_connection(host, port)
            # Hang guard only: a connection over the cap is closed at once, without a handshake.
            if await asyncio.wait_for(reader.read(), timeout=10) == b"":
                refused += 1
            writer.close()
        counted = server.connection_count
        for _, writer in silent:
            writer.close()
        await until(lambda: server.connection_count == 0)
        return refused, counted, await peer_common_name(server, client_context(ca))

    tls = dict(certfile=certfile, keyfile=keyfile, tls_handshake_timeout=60.0)
    assert serve(test, **tls, max_connections_per_ip=3) == (4, 3, "first")


def test_tls_handshakes_in_progress_count_against_the_global_cap(ca, tmp_path):
    certfile, keyfile = write_cert(ca, tmp_path, "first")

    async def test(server):
        host, port = server.addresses["tls"]
        silent = [await asyncio.open_connection(host, port) for _ in range(2)]
        await until(lambda: server.connection_count == 2)
        reader, writer = await asyncio.open_connection(*server.addresses["plain"])
        refused = await asyncio.wait_for(reader.read(), timeout=10)  # hang guard only
        writer.close()
        for _, silent_writer in silent:
            silent_writer.close()
        return refused

    expected = f"-ERR [SYS/TEMP] {TEXT_TOO_MANY_CONNECTIONS}\r\n".encode()
    tls = dict(certfile=certfile, keyfile=keyfile, tls_handshake_timeout=60.0)
    assert serve(test, **tls, max_connections=2) == expected


class ExhaustedSocket(socket.socket):
    """A listening socket whose first ``failures`` accepts fail as if out of file descriptors."""

    failures = 3
    attempts = 0

    def accept(self):
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_running_out_of_file_descriptors_pauses_accepting_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(server_module, "ACCEPT_PAUSE_SECONDS", 0.01)
    listener = ExhaustedSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    pauses = []
    real_call_later = asyncio.BaseEventLoop.call_later

    def call_later(loop, delay, callback, *args, **kwargs):
        if delay == 0.01:
            pauses.append(delay)
        return real_call_later(loop, delay, callback, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "call_later", call_later)

    async def test(server):
        reader, writer = await asyncio.open_connection(*server.addresses["plain"])
        greeting = await reader.readline()
        writer.close()
        return greeting

    with caplog.at_level(logging.INFO):
        assert serve(test, sockets={"plain": listener}) == ok(GREETING)
    assert listener.failures == 0
    assert len(pauses) == 3
    assert [(record.name, record.levelname) for record in caplog.records] == [("pop3.server", "WARNING")]
    assert "out of file descriptors" in caplog.messages[0]
    assert "Too many open files" in caplog.messages[0]
    assert caplog.records[0].exc_info is None
