"""The LMTP listener (RFC 2033) for Postfix and Exim: asyncio I/O around the sans-IO core.

A small asyncio server of our own rather than aiosmtpd: after DATA, LMTP owes one reply per
accepted recipient, in RCPT order, on the error paths too (message too large, line too long,
database down), and the message must reach the store in bounded memory. aiosmtpd answers
those error paths with a single line (aio-libs/aiosmtpd#517) and buffers about three copies
of the message.

The protocol (commands, replies, limits, dot-unstuffing) is :mod:`.protocol`; this module
reads and writes, looks recipients up at RCPT, spools the message as it arrives (each read
once, into a :class:`~mailadmin.mailin.messagefile.MessageSpooler`: one chunk in memory, the
rest in a temporary file) and stores deliveries through a :class:`GroupCommitter` on the
database executor; on PostgreSQL a plain delivery's look-up and statement go from the loop
itself (``store.LoopStatements``). Each ``250`` is sent only after its copy is committed; a
connection that drops mid-DATA leaves nothing behind.
"""

import asyncio
import logging
import socket
from dataclasses import dataclass

from mailadmin.executors import DATABASE_ERRORS, BoundedExecutor
from mailadmin.hosting.figures import DeliveryTally
from mailadmin.hosting.store import LoopStatements
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    RecipientResult,
    count_refusal,
    deliver_group,
    look_up_recipient,
    look_up_recipient_on_the_loop,
    outcome_name,
    stored_alone_on_the_loop,
)
from mailadmin.mailin.lmtp import protocol
from mailadmin.mailin.lmtp.protocol import (
    NEED_DATA,
    Close,
    Connection,
    Event,
    MessageData,
    MessageEnd,
    MessageRefused,
    RcptTo,
    Reply,
    State,
    recipient_reply,
    reply,
)
from mailadmin.mailin.messagefile import MessageSpooler, MessageTooLarge
from pop3.session import log_text

logger = logging.getLogger(__name__)

# Stop reading from a client with this much unprocessed input (pipelining backpressure).
INPUT_HIGH_WATER = 256 * 1024

STATUS_REPLIES = {
    DeliveryStatus.DELIVERED: protocol.REPLY_DELIVERED,
    DeliveryStatus.NO_SUCH_MAILBOX: protocol.REPLY_USER_UNKNOWN,
    DeliveryStatus.MAILBOX_INACTIVE: protocol.REPLY_MAILBOX_DISABLED,
    DeliveryStatus.TOO_LARGE: protocol.REPLY_TOO_BIG,
    DeliveryStatus.TEMPORARY_FAILURE: protocol.REPLY_TEMPORARY_FAILURE,
    DeliveryStatus.OUTSIDE_DESTINATION: protocol.REPLY_OUTSIDE_DESTINATION,
    DeliveryStatus.ALIAS_LOOP: protocol.REPLY_ALIAS_LOOP,
}

TEMPORARY_FAILURE = outcome_name(DeliveryStatus.TEMPORARY_FAILURE)
# How the delivery figures count a message refused while it was read.
REFUSAL_OUTCOMES = {
    protocol.REPLY_TOO_BIG: outcome_name(DeliveryStatus.TOO_LARGE),
    protocol.REPLY_LINE_TOO_LONG: "line_too_long",
}


@dataclass(frozen=True)
class LmtpConfig:
    """Built from settings by ``runlmtp``, the one place that knows their defaults."""

    policy: protocol.Policy
    over_quota_permanent: bool
    idle_timeout: float
    max_group: int  # messages committed together at most (GroupCommitter)
    group_writers: int  # groups committing at once (GroupCommitter)
    db_threads: int  # the database executor's threads: the writers', and RCPT look-ups'


class GroupCommitter:
    """Stores deliveries a group at a time; those that arrive meanwhile wait for the next.

    Every ``250`` waits for a commit, and each commit is an fsync (SQLite, under its single
    write lock) or a WAL flush (PostgreSQL). Committing whatever has queued up (up to
    ``max_group`` messages) in one transaction turns N commits into one. On SQLite one writer
    per process never queues behind its own lock; on PostgreSQL, where a commit is mostly a
    wait for the server, ``writers`` groups commit at once. Each group's transaction also writes
    the refusals ``tally`` counted since the last one (see ``mailadmin.hosting.figures``).
    With ``statements`` (PostgreSQL), a group of one plain copy is stored from the loop itself.
    """

    def __init__(
        self,
        executor: BoundedExecutor,
        max_group: int,
        writers: int = 1,
        tally: DeliveryTally | None = None,
        statements: LoopStatements | None = None,
    ) -> None:
        self.executor = executor
        self.statements = statements
        self.tally = tally or DeliveryTally()
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
                deliveries = [delivery for delivery, _ in group]
                results = await self._stored_on_the_loop(deliveries)
                if results is None:
                    results = await self.executor.run(deliver_group, deliveries, self.tally)
            except Exception as error:  # every waiting session answers for its own recipients
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _stored_on_the_loop(self, deliveries: list[Delivery]) -> list[list[RecipientResult]] | None:
        """A group of one copy stored by its statement sent from the loop (PostgreSQL), or None
        for the database thread to store (``delivery.stored_alone_on_the_loop``)."""
        if self.statements is None:
            return None
        return await stored_alone_on_the_loop(deliveries, self.tally, self.statements, self.executor.run)


class ConnectionClosed(Exception):
    pass


class LmtpSession(asyncio.Protocol):
    """One LMTP client: bytes to the protocol core, its events to the store, replies back."""

    def __init__(
        self, config: LmtpConfig, executor: BoundedExecutor, committer: GroupCommitter, sessions: set
    ) -> None:
        self.config = config
        self.executor = executor
        self.committer = committer
        self.conn: Connection[Recipient] = Connection(config.policy)
        self._sessions = sessions
        self._paused = False
        self._closed = False
        self._waiter: asyncio.Future | None = None
        self._replies: list[bytes] = []
        self._spooler: MessageSpooler | None = None
        self._committing = False
        self.task: asyncio.Task | None = None
        self.closing = False  # set by a shutdown: end after the transaction in flight

    @property
    def busy(self) -> bool:
        """Inside DATA or its commit: a shutdown lets it finish rather than risk a duplicate."""
        return self.conn.state is State.DATA or self._committing

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._sessions.add(self)
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        if self.conn.buffered_bytes > INPUT_HIGH_WATER and not self._paused:
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

    # Reading and writing ---------------------------------------------------------------------

    async def _wait_for_input(self) -> None:
        """Wait for bytes once the core has used up what it had (and resume reading)."""
        self._flush()  # RFC 2920: never wait for input with replies held back
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        if self._closed:
            raise ConnectionClosed()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.config.idle_timeout):
                await self._waiter
        finally:
            self._waiter = None

    def _reply(self, data: bytes) -> None:
        """Queue a reply; pipelined commands' replies leave together (one send, not one each)."""
        self._replies.append(data)

    def _flush(self) -> None:
        if self._replies and not self._closed:
            self.transport.write(b"".join(self._replies))
        self._replies.clear()

    # Events ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            self._reply(self.conn.greeting())
            while not (self.closing and not self.busy):
                event = self.conn.next_event()
                if event is NEED_DATA:
                    await self._wait_for_input()
                elif not await self._handle(event):
                    break
            else:
                self._reply(reply(protocol.REPLY_SHUTTING_DOWN))
        except (ConnectionClosed, ConnectionError):
            pass
        except TimeoutError:
            self._reply(reply(protocol.REPLY_IDLE))
        except asyncio.CancelledError:
            self._reply(reply(protocol.REPLY_SHUTTING_DOWN))
        except Exception:
            logger.exception("LMTP session failed")
            self._reply(reply(protocol.REPLY_INTERNAL_ERROR))
        finally:
            self._flush()
            self._drop_spool()
            self.conn.closed()
            self._sessions.discard(self)
            self.transport.close()

    async def _handle(self, event: Event) -> bool:
        """Act on one event; False once the session is to end."""
        if isinstance(event, MessageData):
            self._spool(event.data)
        elif isinstance(event, Reply):
            self._reply(event.data)
        elif isinstance(event, RcptTo):
            self._reply(await self._rcpt(event))
        elif isinstance(event, MessageEnd):
            self._reply(await self._deliver(event))
        elif isinstance(event, MessageRefused):
            self._drop_spool()
            outcome = REFUSAL_OUTCOMES.get(event.refusal, "refused")
            for recipient in event.recipients:
                count_refusal(self.committer.tally, recipient.address, outcome)
            self._reply(event.data)
        elif isinstance(event, Close):
            self._reply(event.data)
            return False
        return True

    async def _rcpt(self, event: RcptTo) -> bytes:
        try:
            found = await self._look_up(event)
        except DATABASE_ERRORS:
            logger.warning("RCPT %s: database unavailable", log_text(event.address), exc_info=True)
            count_refusal(self.committer.tally, event.address, TEMPORARY_FAILURE)
            return reply(protocol.REPLY_DATABASE_DOWN)
        if isinstance(found, Recipient):
            return self.conn.accept_recipient(found)
        count_refusal(self.committer.tally, event.address, outcome_name(found))
        return self._status_reply(found, event.address)

    async def _look_up(self, event: RcptTo) -> Recipient | DeliveryStatus:
        """The recipient, from the event loop when it is a mailbox (PostgreSQL), else (or when the
        loop's statement goes unanswered) from a database thread."""
        statements = self.committer.statements
        if statements is not None:
            found = await look_up_recipient_on_the_loop(event.address, event.size_hint, statements)
            if found is not None:
                return found
        return await self.executor.run(look_up_recipient, event.address, event.size_hint)

    def _spool(self, data: bytes) -> None:
        if self._spooler is None:
            self._spooler = MessageSpooler(self.config.policy.max_message_bytes)
        try:
            self._spooler.write(data)
        except MessageTooLarge:
            self._drop_spool()
            self.conn.refuse_message(protocol.REPLY_TOO_BIG)

    def _drop_spool(self) -> None:
        if self._spooler is not None:
            self._spooler.close()
            self._spooler = None

    async def _deliver(self, event: MessageEnd[Recipient]) -> bytes:
        """Commit the message with its group; one reply per recipient, whatever happened."""
        spooler, self._spooler = self._spooler or MessageSpooler(self.config.policy.max_message_bytes), None
        # Whole lines only (each ends in LF), so finishing adds nothing that could pass the limit.
        delivery = Delivery(event.recipients, spooler.finish(), event.sender)
        pending = self.committer.submit(delivery)
        # The group may outlive this session (a shutdown cancels it): the spool lives as long.
        pending.add_done_callback(lambda _: spooler.close())
        self._committing = True
        try:
            results: list[RecipientResult] = await asyncio.shield(pending)
        except Exception:  # every recipient still gets its own reply
            logger.warning("delivery failed", exc_info=True)
            for recipient in event.recipients:
                count_refusal(self.committer.tally, recipient.address, TEMPORARY_FAILURE)
            return b"".join(
                recipient_reply(protocol.REPLY_TEMPORARY_FAILURE, r.address) for r in event.recipients
            )
        finally:
            self._committing = False
        return b"".join(self._result_reply(result) for result in results)

    def _result_reply(self, result: RecipientResult) -> bytes:
        if result.missed:
            missed = ", ".join(f"{copy.recipient} ({copy.status.value})" for copy in result.missed)
            return reply(protocol.REPLY_DELIVERED_EXCEPT.format(rcpt=result.recipient, missed=missed))
        return self._status_reply(result.status, result.recipient)

    def _status_reply(self, status: DeliveryStatus, address: str) -> bytes:
        if status is DeliveryStatus.OVER_QUOTA:
            permanent = self.config.over_quota_permanent
            template = (
                protocol.REPLY_OVER_QUOTA_PERMANENT if permanent else protocol.REPLY_OVER_QUOTA_TEMPORARY
            )
            return recipient_reply(template, address)
        return recipient_reply(STATUS_REPLIES[status], address)


class LmtpServer:
    def __init__(
        self, config: LmtpConfig, executor: BoundedExecutor, statements: LoopStatements | None = None
    ) -> None:
        self.config = config
        self.executor = executor
        self.committer = GroupCommitter(
            executor, config.max_group, config.group_writers, statements=statements
        )
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
