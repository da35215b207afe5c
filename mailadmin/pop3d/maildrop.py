"""The ORM implementation of ``pop3.mailbox.Maildrop``: a leased mailbox for one session.

Reading ahead. Clients fetch in order, and a RETR is latency-bound: the client sends the next
one only once it has the whole of the last. So the maildrop reads before it is asked, on a
database thread while the event loop sends:

* the first chunks of the messages after the one asked for, several in one query (up to
  ``POP3_READAHEAD_BYTES``), fetching the next batch in the background while what is left of
  the last one runs low: a RETR of a message read ahead starts sending at once, with no
  database round trip;
* the following chunks of a long message, as many as ``POP3_READAHEAD_BYTES`` holds in one
  query (at least one), while the last of those before is being sent (``OrmMaildrop.read``).

A client that jumps (RETR 7 after RETR 2) just meets a read of its own; what was read ahead for
the old place is dropped.
"""

import asyncio
import functools
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Sequence
from operator import attrgetter

from django.conf import settings

from mailadmin.collector import collection_paused
from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import store
from mailadmin.pop3d.leases import Lease
from mailadmin.pop3d.snapshots import SnapshotCache
from pop3.mailbox import MaildropError, MessageGone, MessageInfo, SharedSnapshot

# Messages whose first chunks one batch reads at most; its bytes are bounded by the setting
# POP3_READAHEAD_BYTES. A batch is read when less than half of that is left ahead, so a session
# holds up to one and a half times the setting (and a chunk) from its first RETR until it ends,
# and while it sends a message longer than a chunk, the chunk being sent and the larger of the
# setting and a chunk read on (``OrmMaildrop.read``): at 512 KiB and chunks of 256 KiB, up to
# 1.5 MiB. Each batch is a query and two thread hand-overs: at 128 KiB about one a message of
# ordinary mail (70 KB on average), and runpop3 spent a tenth more CPU per MB retrieved on
# PostgreSQL than at 512 KiB.
READAHEAD_MESSAGES = 64


def snapshot(mailbox_id: int) -> Sequence[MessageInfo]:
    """The login snapshot; call it on a database thread: 100,000 messages take a while, unless
    the process kept them from the mailbox's last login (``snapshots``)."""
    return _snapshots().snapshot(mailbox_id, store.maildrop_version, _read_snapshot)


def _read_snapshot(mailbox_id: int) -> SharedSnapshot:
    with collection_paused():
        return SharedSnapshot(map(MessageInfo._make, store.maildrop_snapshot(mailbox_id)))


@functools.cache
def _snapshots() -> SnapshotCache:
    return SnapshotCache(settings.POP3_SNAPSHOT_CACHE_MESSAGES, settings.POP3_SNAPSHOT_CACHE_MIN_MESSAGES)


class OrmMaildrop:
    """Messages snapshotted at login; every database call runs on the bounded executor."""

    def __init__(
        self,
        executor: BoundedExecutor,
        lease: Lease,
        messages: Sequence[MessageInfo],
        password_fingerprint: str = "",
    ) -> None:
        self.executor = executor
        self.lease = lease
        self.mailbox_id = lease.mailbox_id
        # What the password hash looked like at login: the monitor kicks the session if it changes.
        self.password_fingerprint = password_fingerprint
        self.messages = messages
        self._ahead = _FirstChunks(self)
        self._readahead_bytes = settings.POP3_READAHEAD_BYTES
        self._chunk_size = settings.MAILADMIN_CHUNK_SIZE_BYTES

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        """Chunk by chunk, stopping at the known size: no query just to find the end.

        While a chunk is sent the next are read: chunk 1 alone (a TOP of a long message
        mostly ends within chunk 0, and drops what was read on), then as many a query as
        ``POP3_READAHEAD_BYTES`` holds, each time the last of the chunks before is sent.
        """
        if not info.size:
            return
        first = await self._ahead.take(info)
        ready = deque() if first is None else deque([first])
        # Counted in the larger of chunk 0 and the setting's chunk: a message stored in larger
        # chunks than the setting's now is counted in its own (chunk 0 of a message longer
        # than a chunk is a whole one), and a short chunk 0 never makes a query read more.
        stored_chunk = max(len(first or b""), self._chunk_size)
        per_read = max(1, self._readahead_bytes // stored_chunk)
        remaining, next_seq, count = info.size, 1, 0
        stored_end = False  # a read on came back short: no chunk follows the last one read
        following: asyncio.Task | None = None
        try:
            while ready:
                chunk = ready.popleft()
                remaining -= len(chunk)
                if remaining > 0 and not ready and not stored_end:
                    count = 1 if next_seq == 1 else min(per_read, -(-remaining // stored_chunk))
                    following = asyncio.ensure_future(
                        self._database(store.read_chunks, info.key, next_seq, count)
                    )
                    next_seq += count
                yield chunk
                if remaining <= 0:
                    return
                if not ready and following is not None:
                    batch, following = await following, None
                    stored_end = len(batch) < count
                    ready.extend(batch)
            raise MessageGone(f"message {info.uidl} is gone")
        finally:
            _abandon(following)

    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        await self._database(
            store.commit_maildrop, self.mailbox_id, self.lease.owner, [info.key for info in deleted]
        )

    async def release(self) -> None:
        self._ahead.drop()
        await self.lease.release()

    async def _database(self, function, *args):
        try:
            return await self.executor.run(function, *args)
        except (*TRANSIENT_DB_ERRORS, store.StoreError) as error:
            raise MaildropError(str(error)) from error


class _FirstChunks:
    """The first chunks read ahead of one session's client (see the module docstring)."""

    def __init__(self, maildrop: OrmMaildrop) -> None:
        self._maildrop = maildrop
        self._messages = maildrop.messages
        self._chunk_size = settings.MAILADMIN_CHUNK_SIZE_BYTES
        self._budget = settings.POP3_READAHEAD_BYTES
        self._ready: dict[object, bytes] = {}
        self._ready_bytes = 0
        self._pending: asyncio.Task | None = None  # the batch in flight
        self._pending_keys: frozenset = frozenset()
        self._next = 0  # where in the snapshot the next batch starts

    async def take(self, info: MessageInfo) -> bytes | None:
        """The first chunk of ``info``, or None when the message is gone."""
        if info.key not in self._ready and info.key in self._pending_keys:
            await self._settle()
        if info.key not in self._ready:
            self._restart(await self._read_from(info))
        chunk = self._ready.pop(info.key, None)
        if chunk is not None:
            self._ready_bytes -= len(chunk)
        self._top_up()
        return chunk

    def _top_up(self) -> None:
        """Start reading the next batch once less than half of the budget is left ahead."""
        if self._pending is not None or self._next >= len(self._messages):
            return
        if self._ready_bytes >= self._budget // 2:
            return
        keys = self._batch(self._next)
        self._next += len(keys)
        self._pending_keys = frozenset(keys)
        self._pending = asyncio.ensure_future(self._read_ahead(keys))

    async def _read_ahead(self, keys: list) -> dict[object, bytes]:
        """A batch read before it is asked for; one that fails reads nothing: its messages are
        read again when asked for, and that read reports the failure. So it skips the health
        check (on PostgreSQL a round trip of its own): a dropped connection fails it, is
        replaced after it, and the RETR reads again on the new one."""
        try:
            return await self._maildrop._database(store.read_first_chunks, keys, False)
        except MaildropError:
            return {}

    def drop(self) -> None:
        """Forget what was read ahead: the session is over."""
        _abandon(self._pending)
        self._pending, self._pending_keys = None, frozenset()
        self._ready, self._ready_bytes = {}, 0

    async def _read_from(self, info: MessageInfo) -> dict[object, bytes]:
        """A batch starting at ``info``, read now; raises MaildropError."""
        index = bisect_left(self._messages, info.key, key=attrgetter("key"))
        if index == len(self._messages) or self._messages[index].key != info.key:
            return await self._maildrop._database(store.read_first_chunks, [info.key])
        keys = self._batch(index)
        chunks = await self._maildrop._database(store.read_first_chunks, keys)
        self._next = index + len(keys)
        return chunks

    def _restart(self, chunks: dict[object, bytes]) -> None:
        """The client is somewhere that was not read ahead: what was is of no more use."""
        self.drop()
        self._ready = chunks
        self._ready_bytes = sum(map(len, chunks.values()))

    async def _settle(self) -> None:
        """Wait for the batch in flight; a batch that failed or was cancelled (its event loop
        closed) is as if never asked for."""
        pending, self._pending = self._pending, None
        self._pending_keys = frozenset()
        chunks = {} if pending.cancelled() else await pending
        self._ready.update(chunks)
        self._ready_bytes += sum(map(len, chunks.values()))

    def _batch(self, index: int) -> list:
        """Keys from ``index`` on whose first chunks fit in the budget (at least one)."""
        first = self._messages[index]
        keys, total = [first.key], min(first.size, self._chunk_size)
        for following in self._messages[index + 1 : index + READAHEAD_MESSAGES]:
            total += min(following.size, self._chunk_size)
            if total > self._budget:
                break
            keys.append(following.key)
        return keys


def _abandon(task: asyncio.Task | None) -> None:
    """Stop waiting for ``task``; a failure it already met is taken, so none is logged as lost."""
    if task is None:
        return
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()
