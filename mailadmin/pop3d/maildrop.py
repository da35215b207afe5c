"""The ORM implementation of ``pop3.mailbox.Maildrop``: a leased mailbox for one session."""

from bisect import bisect_left
from collections.abc import AsyncIterator, Sequence
from operator import attrgetter

from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import store
from mailadmin.pop3d.leases import Lease
from pop3.mailbox import MaildropError, MessageGone, MessageInfo

# Clients fetch in order, and most mail is small: the first RETR of a small message reads the
# small messages after it in the same query, so the next RETRs cost no database round trip.
READAHEAD_BYTES = 32 * 1024
READAHEAD_MESSAGES = 64


def snapshot(mailbox_id: int) -> list[MessageInfo]:
    """The login snapshot; call it on a database thread: 100,000 messages take a while."""
    return list(map(MessageInfo._make, store.maildrop_snapshot(mailbox_id)))


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
        self._readahead: dict[int, bytes] = {}

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        """Chunk by chunk, stopping at the known size: no query just to find the end."""
        seq, remaining = 0, info.size
        while remaining > 0:
            chunk = await self._chunk(info, seq)
            if chunk is None:
                raise MessageGone(f"message {info.uidl} is gone")
            yield chunk
            remaining -= len(chunk)
            seq += 1

    async def _chunk(self, info: MessageInfo, seq: int) -> bytes | None:
        if seq == 0 and info.size <= READAHEAD_BYTES:
            if info.key not in self._readahead:
                self._readahead = await self._database(store.read_first_chunks, self._small_run(info))
            return self._readahead.pop(info.key, None)
        return await self._database(store.read_chunk, info.key, seq)

    def _small_run(self, info: MessageInfo) -> list[int]:
        """``info`` and the messages after it, while they fit in READAHEAD_BYTES together."""
        keys, total = [info.key], info.size
        start = bisect_left(self.messages, info.key, key=attrgetter("key")) + 1
        for following in self.messages[start : start + READAHEAD_MESSAGES - 1]:
            total += following.size
            if total > READAHEAD_BYTES:
                break
            keys.append(following.key)
        return keys

    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        await self._database(
            store.commit_maildrop, self.mailbox_id, self.lease.owner, [info.key for info in deleted]
        )

    async def release(self) -> None:
        await self.lease.release()

    async def _database(self, function, *args):
        try:
            return await self.executor.run(function, *args)
        except (*TRANSIENT_DB_ERRORS, store.StoreError) as error:
            raise MaildropError(str(error)) from error
