"""One POP3 client session: protocol events in, maildrop and authenticator calls, replies out.

The session owns the protocol :class:`~pop3.protocol.Connection` and talks to the network
only through a :class:`SessionIO` (implemented by ``pop3.server``), so it can be driven by
tests without sockets. DELE only marks; the maildrop is changed only by ``commit()`` in the
UPDATE state after QUIT. Every other way out (drop, timeout, kick, shutdown, error) releases
the maildrop without applying anything (RFC 1939 sections 6 and 8).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from operator import attrgetter
from typing import Protocol

from pop3 import protocol
from pop3.mailbox import (
    Authenticator,
    ConnectionInfo,
    EndReason,
    LoginFailure,
    LoginRequest,
    Maildrop,
    MaildropError,
    MessageInfo,
    NullObserver,
    SessionObserver,
    SessionStats,
    SharedSnapshot,
)
from pop3.protocol import ResponseCode, err, multiline, ok

logger = logging.getLogger(__name__)

HOLD_BYTES = 16 * 1024  # replies held back at most before they are sent (see Session._write)
# Pipelined commands answered in a row before the session sends what it holds and lets the event
# loop serve others: a client sending 60 KiB of CAPA lines at once must not hold every other
# session for the ~9,000 replies (measured: a logged-in NOOP waited 5 s behind ten such
# clients), while each turn costs a send and a pass of the loop (128 rather than 32: 1,000
# pipelined LIST n/UIDL n took less wall time in each of three alternating runs).
COMMANDS_PER_TURN = 128

TEXT_LOGGED_IN = "Logged in."
TEXT_NO_SUCH_MESSAGE = "No such message."
TEXT_DELETED = "Message is deleted."
TEXT_MARKED = "Marked to be deleted."
TEXT_STORE_FAILED = "Mail store temporarily unavailable."
TEXT_LOGOUT = "Logging out."
TEXT_LOGOUT_DELETED = "Logging out, messages deleted."
TEXT_COMMIT_FAILED = "Some deleted messages were not removed."
TEXT_SHUTTING_DOWN = "Server shutting down."
TEXT_KICKED = "Disconnected by an administrator."
REPLY_NOOP = ok()

LOGIN_FAILURE_REPLIES = {
    LoginFailure.BAD_CREDENTIALS: (protocol.TEXT_AUTH_FAILED, ResponseCode.AUTH),
    LoginFailure.IN_USE: ("Mailbox is locked by another POP3 session.", ResponseCode.IN_USE),
    LoginFailure.LOGIN_DELAY: ("Logged in too recently; try again later.", ResponseCode.LOGIN_DELAY),
    LoginFailure.TEMPORARY: ("Temporary authentication failure.", ResponseCode.SYS_TEMP),
}

# Characters that could end a log field or start a new one ("user=<x> rip=..."), escaped in
# client text written to a log line, as every space, control and unprintable character is.
_LOG_DELIMITERS = frozenset('\\<>="')


def log_text(text: str) -> str:
    """Client text as one log field that can neither end early nor fake another.

    Printable characters other than white space and ``\\ < > = "`` stand as they are; every
    other character is written as ``\\xHH``, ``\\uHHHH`` or ``\\UHHHHHHHH``.
    """
    if text.isprintable() and " " not in text and _LOG_DELIMITERS.isdisjoint(text):
        return text
    return "".join(_log_char(c) for c in text)


def _log_char(c: str) -> str:
    if c.isprintable() and not c.isspace() and c not in _LOG_DELIMITERS:
        return c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class ConnectionLost(Exception):
    """The client went away."""


class ReplyCutShort(Exception):
    """A multi-line reply already under way could not be finished; the session must close."""


class SessionIO(Protocol):
    """The network side of a session, as ``pop3.server`` provides it."""

    info: ConnectionInfo

    async def receive(self) -> bytes:
        """The next bytes from the client; raises ConnectionLost at end of stream."""

    def write(self, data: bytes) -> None: ...

    @property
    def writable(self) -> bool:
        """True while the client keeps up: drain() would return at once."""

    async def drain(self) -> None:
        """Wait while the client is not reading (flow control); raises ConnectionLost."""

    async def start_tls(self) -> tuple[str, str]:
        """Upgrade to TLS; return (version, cipher). Raises ConnectionLost if it fails."""

    def tls_details(self) -> tuple[str, str]:
        """(version, cipher) of the TLS layer, or empty strings without one."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Timeouts:
    """Seconds; the embedding application chooses them (runpop3: from Django settings).

    ``login`` is the total time allowed before login; ``idle`` the time a logged-in client may
    stay silent (RFC 1939 section 3: an autologout timer is at least 10 minutes).
    """

    login: float
    idle: float


class Session:
    def __init__(
        self,
        io: SessionIO,
        authenticator: Authenticator,
        *,
        policy: protocol.Policy,
        observer: SessionObserver | None = None,
        timeouts: Timeouts,
        greeting: str,
    ) -> None:
        self.io = io
        self.authenticator = authenticator
        self.observer = observer or NullObserver()
        self.conn = protocol.Connection(policy)
        self.stats = SessionStats()
        self.username = ""
        self._timeouts = timeouts
        self._greeting = greeting
        self._maildrop: Maildrop | None = None
        self._messages: Sequence[MessageInfo] = ()  # the maildrop's snapshot, once logged in
        self._deleted: set[int] = set()
        self._live = (0, 0)  # (count, octets) of messages not marked deleted
        self._login_deadline = 0.0
        self._end_reason: EndReason | None = None
        self._updating = False
        self._task: asyncio.Task | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0

    # Life cycle ------------------------------------------------------------------------------

    async def run(self) -> EndReason:
        self._task = asyncio.current_task()
        self._login_deadline = time.monotonic() + self._timeouts.login
        self.observer.opened(self.io.info)
        if self.io.info.implicit_tls:
            self.observer.tls_established(*self.io.tls_details())
        reason = EndReason.ERROR
        try:
            async with contextlib.AsyncExitStack() as teardown:
                # Run last to first, each whatever the others do (a release that raises included).
                teardown.callback(self.io.close)
                teardown.callback(lambda: self.observer.closed(reason, self.stats))
                teardown.callback(self.conn.closed)
                teardown.push_async_callback(self._release)
                teardown.callback(self._flush_if_open)
                reason = await self._converse()
        except Exception:
            logger.exception("POP3 session %s: teardown failed", self.io.info.session_id)
        return reason

    async def _converse(self) -> EndReason:
        """Greet and serve the client until the session ends; return why it ended."""
        try:
            self._write(ok(self._greeting))
            return await self._serve()
        except asyncio.CancelledError:
            reason = self._end_reason or EndReason.SHUTDOWN
            self._say_goodbye(reason)
            return reason
        except ConnectionLost:
            return EndReason.DROPPED
        except TimeoutError:
            return EndReason.TIMEOUT  # RFC 1939 section 3: close without a response
        except ReplyCutShort as error:
            logger.warning(
                "POP3 session %s <%s>: %s; closing", self.io.info.session_id, log_text(self.username), error
            )
            return EndReason.ERROR
        except Exception:
            logger.exception("POP3 session failed")
            return EndReason.ERROR

    def kick(self, reason: EndReason = EndReason.KICKED) -> bool:
        """End the session from outside (admin kick, shutdown) without applying deletions.

        Returns False when the session is already committing its QUIT, which is left to finish.
        """
        if self._updating or self._task is None or self._task.done():
            return False
        self._end_reason = reason
        self._task.cancel()
        return True

    def _say_goodbye(self, reason: EndReason) -> None:
        text = TEXT_KICKED if reason is EndReason.KICKED else TEXT_SHUTTING_DOWN
        try:
            self._write(err(text, ResponseCode.SYS_TEMP))
        except ConnectionLost:
            pass

    async def _release(self) -> None:
        if self._maildrop is not None:
            maildrop, self._maildrop = self._maildrop, None
            await asyncio.shield(maildrop.release())

    # The command loop ------------------------------------------------------------------------

    async def _serve(self) -> EndReason:
        answered = 0  # commands answered since the session last let others run for sure
        while True:
            event = self.conn.next_event()
            if event is protocol.NEED_DATA:
                await self._receive()  # returns at once when input is queued: no turn for others
                continue
            self.stats.commands += 1
            answer = _ANSWERS.get(type(event))
            if answer is not None:
                self._write(answer(self, event))
            elif isinstance(event, protocol.Close):
                self._write(event.data)
                return EndReason.QUIT if event.reason == "quit" else EndReason.ERROR
            elif isinstance(event, protocol.Quit):
                await self._update()
                return EndReason.QUIT
            else:
                await self._dispatch(event)
            answered += 1
            if answered >= COMMANDS_PER_TURN:
                answered = 0
                self._flush()
                await asyncio.sleep(0)
            if not self.io.writable:
                await self._drain()
            self.observer.progress(self.stats)

    async def _receive(self) -> None:
        self._flush()  # every reply is out before waiting for the client
        if self.conn.state is protocol.State.AUTHORIZATION:
            timeout = max(0.0, self._login_deadline - time.monotonic())
        else:
            timeout = self._timeouts.idle
        async with asyncio.timeout(timeout):
            data = await self.io.receive()
        self.stats.bytes_in += len(data)
        self.conn.receive_data(data)

    async def _drain(self) -> None:
        """Send what is held; wait for a client that is slow to read, but not forever (RFC 1939
        autologout)."""
        self._flush()
        if self.io.writable:
            return
        async with asyncio.timeout(self._timeouts.idle):
            await self.io.drain()

    def _write(self, data: bytes) -> None:
        """Hold replies until the session waits (for the client, a password check, the database)
        or has a few KiB: pipelined commands (RFC 2449) then cost one send for many replies
        instead of a system call each."""
        self.stats.bytes_out += len(data)
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes >= HOLD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
            self.io.write(data)

    def _flush_if_open(self) -> None:
        try:
            self._flush()
        except ConnectionLost:
            pass

    async def _dispatch(self, event: protocol.Event) -> None:
        """The commands that wait: for the TLS handshake, the authenticator or the database.
        The others are answered at once from the snapshot (``_ANSWERS``)."""
        match event:
            case protocol.StartTls(data=data):
                await self._start_tls(data)
            case protocol.Credentials():
                await self._login(event)
            case protocol.AuthRejected(mechanism=mechanism, reason=reason):
                await self._reject(mechanism, reason)
            case protocol.Retr(number=number):
                await self._send_message(number, None)
            case protocol.Top(number=number, lines=lines):
                await self._send_message(number, lines)
            case _:
                raise protocol.LocalProtocolError(f"unhandled event {event!r}")

    def _answer_stat(self, event: protocol.Stat) -> bytes:
        return ok("{} {}".format(*self._live))

    def _answer_list(self, event: protocol.ListMessages) -> bytes:
        if event.number is None:
            return self._listing("size")
        found = self._lookup(event.number)
        return found if isinstance(found, bytes) else b"+OK %d %d\r\n" % (event.number, found.size)

    def _answer_uidl(self, event: protocol.Uidl) -> bytes:
        if event.number is None:
            return self._listing("uidl")
        found = self._lookup(event.number)
        return found if isinstance(found, bytes) else ok(f"{event.number} {found.uidl}")

    def _answer_dele(self, event: protocol.Dele) -> bytes:
        found = self._lookup(event.number)
        return found if isinstance(found, bytes) else self._mark_deleted(event.number, found)

    def _answer_rset(self, event: protocol.Rset) -> bytes:
        self._deleted.clear()
        self._live = (len(self._messages), sum(info.size for info in self._messages))
        self.stats.marked_count = self.stats.marked_bytes = 0
        return ok("maildrop has {} messages ({} octets)".format(*self._live))

    # AUTHORIZATION ---------------------------------------------------------------------------

    async def _start_tls(self, data: bytes) -> None:
        self._write(data)
        self._flush()  # the +OK goes out in plaintext, before the handshake
        if self.conn.buffered_bytes:
            raise ConnectionLost("plaintext arrived behind STLS")
        version, cipher = await self.io.start_tls()
        self.conn.tls_started()
        self.observer.tls_established(version, cipher)

    async def _login(self, event: protocol.Credentials) -> None:
        request = LoginRequest(
            username=event.username,
            password=event.password,
            mechanism=event.mechanism,
            peer_host=self.io.info.peer[0],
            secure=self.conn.policy.tls_active,
            session_id=self.io.info.session_id,
        )
        self._flush()  # the replies before it must not wait behind a password check
        result = await self.authenticator.authenticate(request)
        self.username = result.username or event.username
        if result.maildrop is None:
            failure = result.failure or LoginFailure.TEMPORARY
            self.observer.login_failed(self.username, failure, event.mechanism)
            text, code = LOGIN_FAILURE_REPLIES[failure]
            self._write(err(text, code))
            return
        self.observer.logged_in(self.username, event.mechanism, result.maildrop)
        self._maildrop = result.maildrop
        self._messages = result.maildrop.messages
        self.conn.login_succeeded()
        self._live = (len(self._messages), sum(info.size for info in self._messages))
        self.stats.message_count, self.stats.message_bytes = self._live
        self._write(ok(TEXT_LOGGED_IN))

    async def _reject(self, mechanism: str, reason: str) -> None:
        self._flush()
        await self.authenticator.reject(self.io.info.session_id, self.io.info.peer[0], mechanism, reason)
        self.observer.login_failed(self.username, LoginFailure.BAD_CREDENTIALS, mechanism)
        self._write(err(protocol.TEXT_AUTH_FAILED, ResponseCode.AUTH))

    # TRANSACTION -----------------------------------------------------------------------------

    def _listing(self, field: str) -> bytes:
        """LIST or UIDL of every message not marked deleted (100,000 lines: kept to one pass)."""
        if isinstance(self._messages, SharedSnapshot) and not self._deleted:
            return self._messages.listing(field, lambda: self._make_listing(field))
        return self._make_listing(field)

    def _make_listing(self, field: str) -> bytes:
        numbered = zip(count(1), map(attrgetter(field), self._messages))
        if self._deleted:
            numbered = ((n, value) for n, value in numbered if n not in self._deleted)
        first = "{} messages ({} octets)".format(*self._live)
        if field == "size":
            return protocol.size_listing(first, numbered)
        return multiline(first, [f"{n} {value}" for n, value in numbered])

    def _lookup(self, number: int) -> MessageInfo | bytes:
        """The message numbered ``number``, or the -ERR reply to send instead."""
        if number > len(self._messages):
            return err(TEXT_NO_SUCH_MESSAGE)
        if number in self._deleted:
            return err(TEXT_DELETED)
        return self._messages[number - 1]

    def _mark_deleted(self, number: int, info: MessageInfo) -> bytes:
        self._deleted.add(number)
        self._live = (self._live[0] - 1, self._live[1] - info.size)
        self.stats.marked_count += 1
        self.stats.marked_bytes += info.size
        return ok(TEXT_MARKED)

    async def _send_message(self, number: int, top_lines: int | None) -> None:
        found = self._lookup(number)
        if isinstance(found, bytes):
            self._write(found)
            return
        assert self._maildrop is not None
        limiter = protocol.TopLimiter(found.header_size, top_lines) if top_lines is not None else None
        stuffer = protocol.DotStuffer()
        chunks = self._maildrop.read(found)
        self._flush()  # nor behind the database
        try:
            first = await anext(chunks, None)
        except MaildropError:
            self._write(err(TEXT_STORE_FAILED, ResponseCode.SYS_TEMP))
            return
        status = ok(f"{found.size} octets") if limiter is None else ok()
        sent = len(status)
        self._write(status)
        chunk, read = first, 0
        try:
            while chunk is not None:
                read += len(chunk)
                out = stuffer.feed(limiter.feed(chunk) if limiter else chunk)
                if read >= found.size or (limiter and limiter.done):
                    break  # the last bytes leave with the terminating line: one send, not two
                sent += len(out)
                self._write(out)
                await self._drain()
                chunk = await anext(chunks, None)
            else:
                out = b""
        except MaildropError as error:
            raise ReplyCutShort(f"message {number} could not be read to its end ({error})") from None
        finally:
            await chunks.aclose()
        out += stuffer.finish()
        sent += len(out)
        self._write(out)
        if limiter is None:
            self.stats.retr_count += 1
            self.stats.retr_bytes += sent
        else:
            self.stats.top_count += 1
            self.stats.top_bytes += sent

    # UPDATE ----------------------------------------------------------------------------------

    async def _update(self) -> None:
        """The UPDATE state (RFC 1939 section 6): remove the deleted messages, give the maildrop
        back, and only then answer. A client that logs in again as soon as it has read the
        answer (poplib's ``quit()`` closes at once) then finds the maildrop free, not in use."""
        self.conn.quit_in_transaction()
        deleted = [self._messages[n - 1] for n in sorted(self._deleted)]
        self._updating = True
        self._flush()
        try:
            reply = await self._commit(deleted)
            await self._give_back()
        finally:
            self._updating = False
        self._write(reply)

    async def _give_back(self) -> None:
        """:meth:`_release` for QUIT, whose answer goes out whatever becomes of the release: the
        deletions are done. A release that fails is logged (the lease lapses at its expiry); one
        the server's shutdown cancels goes on, shielded, while the session ends with its answer."""
        try:
            await self._release()
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("POP3 session %s: releasing the maildrop failed", self.io.info.session_id)

    async def _commit(self, deleted: list[MessageInfo]) -> bytes:
        """Remove ``deleted`` from the maildrop; the answer to QUIT."""
        assert self._maildrop is not None
        try:
            if deleted:
                await self._maildrop.commit(deleted)
        except MaildropError:
            logger.warning("UPDATE failed for <%s>", log_text(self.username))
            return err(TEXT_COMMIT_FAILED, ResponseCode.SYS_TEMP)
        self.stats.deleted_count = len(deleted)
        self.stats.deleted_bytes = sum(info.size for info in deleted)
        return ok(TEXT_LOGOUT_DELETED if deleted else TEXT_LOGOUT)


# The commands answered at once from the session's state and the login snapshot, by event type:
# pipelined commands (RFC 2449) are mostly these, so each costs a dictionary look-up and a call
# rather than a coroutine and a walk through every pattern of ``_dispatch``.
_ANSWERS = {
    protocol.Reply: lambda session, event: event.data,
    protocol.Noop: lambda session, event: REPLY_NOOP,
    protocol.Stat: Session._answer_stat,
    protocol.ListMessages: Session._answer_list,
    protocol.Uidl: Session._answer_uidl,
    protocol.Dele: Session._answer_dele,
    protocol.Rset: Session._answer_rset,
}
