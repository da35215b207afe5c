"""The maildrop leases of one runpop3 process: taken, renewed and given back here only.

A lease (a ``MaildropLease`` row, written by ``store.leases``) is the POP3 lock on a mailbox.
Its whole life in this process goes through one :class:`LeaseKeeper`:

* ``Lease.acquire()`` takes it at login, inside the authenticator's database unit, after the
  session limits and before the snapshot; from then on the keeper holds it;
* ``LeaseKeeper.renew()`` pushes the expiry of every held lease forward, once per monitor tick;
* ``Lease.release()`` gives it back when the session ends or the login is abandoned. The keeper
  stops renewing it first, so a release the database refuses leaves a lease that lapses at its
  expiry, never one kept alive for a session that has gone.

The keeper also remembers when it last renewed each lease (on this process's monotonic clock,
measured from before the renewing statement, so never later than the database's view). Once a
held lease has gone unrenewed for longer than its TTL, another session may have taken it over:
``lapsed()`` says so, and runpop3 stops rather than serve mailboxes it may no longer have locked.
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable

from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import store

logger = logging.getLogger(__name__)


class Lease:
    """One session's lock on one mailbox; made by :meth:`LeaseKeeper.lease`."""

    def __init__(self, keeper: "LeaseKeeper", mailbox_id: int, owner: str) -> None:
        self.keeper = keeper
        self.mailbox_id = mailbox_id
        self.owner = owner

    def acquire(self) -> bool:
        """Take the lock (on a database thread); False when another live session holds it."""
        confirmed = self.keeper.clock()
        taken = store.acquire_lease(self.mailbox_id, self.owner, self.keeper.node, self.keeper.ttl_seconds)
        if taken:
            self.keeper._hold(self.owner, confirmed)
        return taken

    async def release(self) -> None:
        """Stop renewing the lock and give it back; a database outage is logged, not raised
        (the lease left behind lapses at its expiry).

        Does nothing for a lease that was never taken, or is already given back.
        """
        if not self.keeper._drop(self.owner):
            return
        try:
            await self.keeper.database.run(store.release_lease, self.owner)
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("could not release lease %s (%s); it lapses at its expiry", self.owner, error)


class LeaseKeeper:
    """Every maildrop lease this process holds, and when each was last known to be ours."""

    def __init__(
        self,
        database: BoundedExecutor,
        *,
        node: str,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.node = node
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        # owner -> when the lease was last taken or renewed. Written from database threads.
        self._held: dict[str, float] = {}
        self._lock = threading.Lock()

    def lease(self, mailbox_id: int) -> Lease:
        return Lease(self, mailbox_id, secrets.token_hex(16))

    def owners(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def renew(self, owners: list[str]) -> None:
        """Push the given leases' expiry forward (on a database thread); the monitor's heartbeat."""
        confirmed = self.clock()
        store.renew_leases(owners, self.ttl_seconds)
        with self._lock:
            for owner in owners:
                if owner in self._held:
                    self._held[owner] = confirmed

    def lapsed(self) -> bool:
        """True once a held lease has gone unrenewed for longer than its TTL."""
        deadline = self.clock() - self.ttl_seconds
        with self._lock:
            return any(confirmed < deadline for confirmed in self._held.values())

    def seconds_left(self) -> float | None:
        """Time until the first held lease lapses unrenewed (0 if one has); None if none is held."""
        with self._lock:
            if not self._held:
                return None
            oldest = min(self._held.values())
        return max(0.0, oldest + self.ttl_seconds - self.clock())

    async def release_all(self) -> None:
        """At shutdown: give back whatever this process still holds; never raises."""
        with self._lock:
            self._held.clear()
        try:
            await self.database.run(store.release_node_leases, self.node)
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("could not release the leases of %s (%s); they lapse at expiry", self.node, error)

    def _hold(self, owner: str, confirmed: float) -> None:
        with self._lock:
            self._held[owner] = confirmed

    def _drop(self, owner: str) -> bool:
        with self._lock:
            return self._held.pop(owner, None) is not None
