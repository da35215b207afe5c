"""An LMTP listener (RFC 2033) for Postfix and Exim, over ``mailadmin.mailin.delivery``.

A small asyncio server of our own rather than aiosmtpd: after DATA, LMTP owes one reply per
accepted recipient, in RCPT order, on the error paths too (message too large, line too long,
database down), and the message must reach the store in bounded memory. aiosmtpd answers
those error paths with a single line (aio-libs/aiosmtpd#517) and buffers about three copies
of the message.

The DATA stream is un-dot-stuffed line by line straight into a
:class:`~mailadmin.mailin.messagefile.MessageSpooler` (one chunk in memory, the rest in a temporary
file); deliveries are stored by a :class:`GroupCommitter` on the database executor, and each
``250`` is sent only after its copy is committed. A connection that drops mid-DATA leaves
nothing behind.
"""

import asyncio
import logging
import re
import socket
from collections import deque
from dataclasses import dataclass, field

from django.db import DatabaseError

from mailadmin.executors import BoundedExecutor
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    RecipientResult,
    deliver_group,
    look_up_recipient,
)
from mailadmin.mailin.messagefile import MessageSpooler, MessageTooLarge

logger = logging.getLogger(__name__)

# RFC 5321 section 4.5.3.1.4: command lines up to 512 octets.
MAX_COMMAND_LINE = 512
# Stop reading from a client with this much unprocessed input (pipelining backpressure).
INPUT_HIGH_WATER = 256 * 1024

# Per-recipient replies after DATA (RFC 2033 section 4.2), and at RCPT.
REPLY_DELIVERED = "250 2.0.0 <{rcpt}> Saved"
REPLIES = {
    DeliveryStatus.NO_SUCH_MAILBOX: "550 5.1.1 <{rcpt}> User unknown",
    DeliveryStatus.MAILBOX_INACTIVE: "550 5.2.1 <{rcpt}> Mailbox disabled",
    DeliveryStatus.TOO_LARGE: "552 5.3.4 Message too big for system",
    DeliveryStatus.TEMPORARY_FAILURE: "451 4.3.0 <{rcpt}> Temporary internal failure",
}
REPLY_OVER_QUOTA_TEMPORARY = "452 4.2.2 <{rcpt}> Mailbox is full"
REPLY_OVER_QUOTA_PERMANENT = "552 5.2.2 <{rcpt}> Mailbox is full"
REPLY_LINE_TOO_LONG = "500 5.5.2 Message line too long"
REPLY_DATABASE_DOWN = "451 4.3.0 Temporary internal failure"

_PATH = re.compile(r"^(FROM|TO):\s*<([^<>]*)>(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class LmtpConfig:
    hostname: str
    max_message_bytes: int
    max_recipients: int = 1000
    max_data_line_bytes: int = 64 * 1024
    over_quota_permanent: bool = False
    idle_timeout: float = 300.0
    max_group: int = 64  # messages committed together at most (GroupCommitter)
    group_writers: int = 1  # groups committing at once (GroupCommitter)


class GroupCommitter:
    """Stores deliveries a group at a time; those that arrive meanwhile wait for the next.

    Every ``250`` waits for a commit, and each commit is an fsync (SQLite, under its single
    write lock) or a WAL flush (PostgreSQL). Committing whatever has queued up (up to
    ``max_group`` messages) in one transaction turns N commits into one. On SQLite one writer
    per process never queues behind its own lock; on PostgreSQL, where a commit is mostly a
    wait for the server, ``writers`` groups commit at once.
    """

    def __init__(self, executor: BoundedExecutor, max_group: int, writers: int = 1) -> None:
        self.executor = executor
        self.max_group = max_group
        self.writers = writers
        self._queue: list[tuple[Delivery, asyncio.Future]] = []
        self._writing = 0  # writers at work; each leaves only once it has found the queue empty
        self._tasks: set[asyncio.Task] = set()  # the event loop keeps only weak references

    def submit(self, delivery: Delivery) -> asyncio.Future:
        """A future of the delivery's results, set once its group is committed."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((delivery, future))
        if self._writing < self.writers:
            self._writing += 1
            writer = asyncio.get_running_loop().create_task(self._write_groups())
            self._tasks.add(writer)
            writer.add_done_callback(self._tasks.discard)
        return future

    async def _write_groups(self) -> None:
        try:
            await self._write_until_empty()
        finally:
            # In the same step as the empty queue was seen: a delivery submitted after this
            # starts a writer of its own, and none is left waiting for a writer that has gone.
            self._writing -= 1

    async def _write_until_empty(self) -> None:
        while self._queue:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            try:
                results = await self.executor.run(deliver_group, [delivery for delivery, _ in group])
            except Exception as error:  # every waiting session answers for its own recipients
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if not future.done():
                    future.set_result(result)


@dataclass
class _Transaction:
    sender: str | None = None
    size_hint: int = 0
    recipients: list[Recipient] = field(default_factory=list)


class ConnectionClosed(Exception):
    pass


class LmtpSession(asyncio.Protocol):
    """One LMTP client."""

    def __init__(
        self, config: LmtpConfig, executor: BoundedExecutor, committer: GroupCommitter, sessions: set
    ) -> None:
        self.config = config
        self.executor = executor
        self.committer = committer
        self._sessions = sessions
        self._input: deque[bytes] = deque()
        self._buffer = bytearray()
        self._queued = 0
        self._paused = False
        self._closed = False
        self._waiter: asyncio.Future | None = None
        self._replies: list[str] = []
        self._greeted = False
        self._transaction = _Transaction()
        self.task: asyncio.Task | None = None
        self.busy = False  # inside DATA: a shutdown lets it finish rather than risk a duplicate
        self.closing = False  # set by a shutdown: end after the transaction in flight

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._sessions.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self._input.append(data)
        self._queued += len(data)
        if self._queued > INPUT_HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # Reading ---------------------------------------------------------------------------------

    async def _fill(self) -> None:
        while not self._input:
            self._flush()  # RFC 2920: never wait for input with replies held back
            if self._closed:
                raise ConnectionClosed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.config.idle_timeout):
                    await self._waiter
            finally:
                self._waiter = None
        while self._input:
            self._buffer += self._input.popleft()
        self._queued = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()

    async def _read_line(self, limit: int) -> bytes | None:
        """The next line with its line ending, or None if it exceeded ``limit`` (then skipped)."""
        too_long = False
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[: newline + 1])
                del self._buffer[: newline + 1]
                return None if too_long or len(line) > limit else line
            if len(self._buffer) > limit:
                too_long = True
                self._buffer.clear()
            await self._fill()

    def _reply(self, *lines: str) -> None:
        """Queue a reply; pipelined commands' replies leave together (one send, not one each)."""
        self._replies.extend(lines)

    def _flush(self) -> None:
        if self._replies and not self._closed:
            self.transport.write("".join(line + "\r\n" for line in self._replies).encode())
        self._replies.clear()

    # Commands --------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            self._reply(f"220 {self.config.hostname} LMTP ready")
            while not self._closed and not self.closing:
                line = await self._read_line(MAX_COMMAND_LINE)
                if line is None:
                    self._reply("500 5.5.2 Line too long")
                    continue
                if not await self._command(line.rstrip(b"\r\n")):
                    break
            else:
                if self.closing:
                    self._reply("421 4.3.2 Shutting down")
        except (ConnectionClosed, ConnectionError):
            pass
        except TimeoutError:
            self._reply("421 4.4.2 Idle for too long, closing connection")
        except asyncio.CancelledError:
            self._reply("421 4.3.2 Shutting down")
        except Exception:
            logger.exception("LMTP session failed")
            self._reply("421 4.3.0 Internal error")
        finally:
            self._flush()
            self._sessions.discard(self)
            self.transport.close()

    async def _command(self, line: bytes) -> bool:
        text = line.decode("utf-8", "replace")
        verb, _, argument = text.partition(" ")
        verb = verb.upper() if verb.isascii() else ""
        if verb == "QUIT":
            self._reply("221 2.0.0 Bye")
            return False
        handler = {
            "LHLO": self._lhlo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
        }.get(verb)
        if verb in ("HELO", "EHLO"):
            self._reply("500 5.5.1 This is LMTP: use LHLO")
        elif verb == "VRFY":
            self._reply("502 5.5.1 VRFY is not supported")
        elif handler is None:
            self._reply("500 5.5.1 Unknown command")
        else:
            await handler(argument.strip())
        return True

    async def _lhlo(self, argument: str) -> None:
        if not argument:
            self._reply("501 5.5.4 LHLO needs a host name")
            return
        self._greeted = True
        self._transaction = _Transaction()
        self._reply(
            f"250-{self.config.hostname}",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            f"250 SIZE {self.config.max_message_bytes}",
        )

    async def _mail(self, argument: str) -> None:
        if not self._greeted:
            self._reply("503 5.5.1 Send LHLO first")
            return
        if self._transaction.sender is not None:
            self._reply("503 5.5.1 Sender already given")
            return
        match = _PATH.match(argument)
        if not match or match.group(1).upper() != "FROM":
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        size_hint = 0
        for parameter in match.group(3).split():
            name, _, value = parameter.partition("=")
            name = name.upper()
            if name == "SIZE" and value.isdigit():
                size_hint = int(value)
            elif not (name == "BODY" and value.upper() in ("7BIT", "8BITMIME")):
                self._reply("555 5.5.4 Unsupported MAIL parameter")
                return
        if size_hint > self.config.max_message_bytes:
            self._reply("552 5.3.4 Message too big for system")
            return
        self._transaction = _Transaction(sender=match.group(2), size_hint=size_hint)
        self._reply("250 2.1.0 Ok")

    async def _rcpt(self, argument: str) -> None:
        transaction = self._transaction
        if transaction.sender is None:
            self._reply("503 5.5.1 Send MAIL first")
            return
        match = _PATH.match(argument)
        if not match or match.group(1).upper() != "TO" or match.group(3).strip():
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(transaction.recipients) >= self.config.max_recipients:
            self._reply("452 4.5.3 Too many recipients")
            return
        recipient = match.group(2)
        try:
            found = await self.executor.run(look_up_recipient, recipient, transaction.size_hint)
        except DatabaseError:
            logger.warning("RCPT %s: database unavailable", recipient, exc_info=True)
            self._reply(REPLY_DATABASE_DOWN)
            return
        if isinstance(found, Recipient):
            transaction.recipients.append(found)
            self._reply("250 2.1.5 Ok")
        else:
            self._reply(self._status_reply(found, recipient))

    async def _rset(self, argument: str) -> None:
        self._transaction = _Transaction()
        self._reply("250 2.0.0 Ok")

    async def _noop(self, argument: str) -> None:
        self._reply("250 2.0.0 Ok")

    async def _data(self, argument: str) -> None:
        transaction = self._transaction
        if transaction.sender is None:
            self._reply("503 5.5.1 Send MAIL first")
            return
        if not transaction.recipients:
            self._reply("503 5.5.1 No valid recipients")
            return
        self._reply("354 2.0.0 End data with <CR><LF>.<CR><LF>")
        spooler = MessageSpooler(self.config.max_message_bytes)
        self.busy = True
        pending = None
        try:
            error = await self._receive_data(spooler)
            if error is None:
                pending = self._submit(transaction, spooler)
                replies = await self._replies_after_commit(transaction, pending)
            else:
                replies = [error.format(rcpt=recipient.address) for recipient in transaction.recipients]
        finally:
            self.busy = False
            if pending is None:
                spooler.close()
        self._transaction = _Transaction()
        self._reply(*replies)

    async def _receive_data(self, spooler: MessageSpooler) -> str | None:
        """Read DATA to its end; return a reply for every recipient if the message was refused.

        Unstuffed lines are spooled together, once per read from the client, not one by one.
        """
        error = None
        lines: list[bytes] = []
        while True:
            if b"\n" not in self._buffer:  # the next line is not all here yet
                error = _spool(spooler, lines, error)
            line = await self._read_line(self.config.max_data_line_bytes)
            if line is None:
                error = error or REPLY_LINE_TOO_LONG
                continue
            if line in (b".\r\n", b".\n"):
                return _spool(spooler, lines, error)
            if error is None:
                lines.append(line[1:] if line.startswith(b".") else line)

    def _submit(self, transaction: _Transaction, spooler: MessageSpooler) -> asyncio.Future:
        delivery = Delivery(transaction.recipients, spooler.finish(), transaction.sender or "")
        pending = self.committer.submit(delivery)
        # The group may outlive this session (a shutdown cancels it): the spool lives as long.
        pending.add_done_callback(lambda _: spooler.close())
        return pending

    async def _replies_after_commit(self, transaction: _Transaction, pending: asyncio.Future) -> list[str]:
        try:
            results: list[RecipientResult] = await asyncio.shield(pending)
        except DatabaseError:
            logger.warning("delivery failed: database unavailable", exc_info=True)
            failed = REPLIES[DeliveryStatus.TEMPORARY_FAILURE]
            return [failed.format(rcpt=recipient.address) for recipient in transaction.recipients]
        return [self._status_reply(result.status, result.recipient) for result in results]

    def _status_reply(self, status: DeliveryStatus, recipient: str) -> str:
        if status is DeliveryStatus.DELIVERED:
            return REPLY_DELIVERED.format(rcpt=recipient)
        if status is DeliveryStatus.OVER_QUOTA:
            template = (
                REPLY_OVER_QUOTA_PERMANENT if self.config.over_quota_permanent else REPLY_OVER_QUOTA_TEMPORARY
            )
            return template.format(rcpt=recipient)
        return REPLIES[status].format(rcpt=recipient)


def _spool(spooler: MessageSpooler, lines: list[bytes], error: str | None) -> str | None:
    """Write ``lines`` to the spool (then forget them); the error reply if the message is refused."""
    if lines and error is None:
        try:
            spooler.write(b"".join(lines))
        except MessageTooLarge:
            error = REPLIES[DeliveryStatus.TOO_LARGE]
    lines.clear()
    return error


class LmtpServer:
    def __init__(self, config: LmtpConfig, executor: BoundedExecutor) -> None:
        self.config = config
        self.executor = executor
        self.committer = GroupCommitter(executor, config.max_group, config.group_writers)
        self.sessions: set[LmtpSession] = set()
        self._server: asyncio.Server | None = None

    def _protocol(self) -> LmtpSession:
        return LmtpSession(self.config, self.executor, self.committer, self.sessions)

    async def listen(self, listener: socket.socket) -> None:
        """Serve a bound, listening TCP or unix socket (shared with other workers under --workers)."""
        loop = asyncio.get_running_loop()
        if listener.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(self._protocol, sock=listener)
        else:
            self._server = await loop.create_server(self._protocol, sock=listener)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle sessions, give those inside DATA ``grace`` seconds to finish."""
        if self._server is not None:
            self._server.close()
        busy = [session.task for session in self.sessions if session.busy and session.task]
        for session in list(self.sessions):
            session.closing = True
            if not session.busy and session.task:
                session.task.cancel()
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
        remaining = [session.task for session in self.sessions if session.task]
        if remaining:
            await asyncio.wait(remaining)
