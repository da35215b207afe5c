"""The ORM implementation of ``pop3.mailbox.Maildrop``: a leased mailbox for one session."""

import logging
from collections.abc import AsyncIterator, Sequence

from django.db import DatabaseError

from mailadmin import store
from mailadmin.executors import BoundedExecutor
from pop3.mailbox import MaildropError, MessageGone, MessageInfo

logger = logging.getLogger(__name__)


class OrmMaildrop:
    """Messages snapshotted at login; every database call runs on the bounded executor."""

    def __init__(
        self,
        executor: BoundedExecutor,
        mailbox_id: int,
        owner: str,
        rows: Sequence[tuple[int, int, str, int]],
        password_fingerprint: str = "",
    ) -> None:
        self.executor = executor
        self.mailbox_id = mailbox_id
        self.owner = owner
        # What the password hash looked like at login: the monitor kicks the session if it changes.
        self.password_fingerprint = password_fingerprint
        self.messages = [
            MessageInfo(key=pk, size=size, uidl=uidl, header_size=header) for pk, size, uidl, header in rows
        ]

    async def read(self, info: MessageInfo) -> AsyncIterator[bytes]:
        seq = 0
        while True:
            chunk = await self._database(store.read_chunk, info.key, seq)
            if chunk is None:
                if seq == 0 and info.size:
                    raise MessageGone(f"message {info.uidl} is gone")
                return
            yield chunk
            seq += 1

    async def commit(self, deleted: Sequence[MessageInfo]) -> None:
        await self._database(
            store.commit_maildrop, self.mailbox_id, self.owner, [info.key for info in deleted]
        )

    async def release(self) -> None:
        try:
            await self._database(store.release_lease, self.owner)
        except MaildropError:
            logger.warning("could not release lease %s; it lapses at its expiry", self.owner)

    async def _database(self, function, *args):
        try:
            return await self.executor.run(function, *args)
        except (DatabaseError, store.StoreError) as error:
            raise MaildropError(str(error)) from error
