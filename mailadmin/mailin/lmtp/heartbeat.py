"""runlmtp's heartbeat: its :class:`~mailadmin.models.LmtpNode` row, and the refusals it counted.

Every ``LMTP_HEARTBEAT_INTERVAL`` one unit on the database executor, in one transaction,
stamps this process's row (the console and ``/metrics`` count it alive while the stamp is
fresh), writes the refusals counted since the last group commit (an MTA that only ever sends
to unknown users still gets its refusals counted), and forgets processes whose stamp lapsed.
A failed beat is logged; its refusals wait for the next one.
"""

import asyncio
import logging

from django.db import transaction
from django.utils import timezone

from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import figures
from mailadmin.models import LmtpNode
from mailadmin.pop3d.registry import stale_after

logger = logging.getLogger(__name__)


class LmtpHeartbeat:
    def __init__(
        self, executor: BoundedExecutor, tally: figures.DeliveryTally, *, node: str, interval: float
    ) -> None:
        self.executor = executor
        self.tally = tally
        self.node = node
        self.interval = interval
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.beat()
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass

    async def beat(self) -> bool:
        """One heartbeat; False when the database failed (and that was logged)."""
        try:
            await self.executor.run(beat, self.node, self.tally, self.interval)
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("LMTP heartbeat: the database is unavailable (%s)", error)
            return False
        except Exception:
            logger.exception("LMTP heartbeat failed")
            return False
        return True

    async def stop(self) -> None:
        """Write what is still counted and sign off; call after the sessions have ended."""
        self._stopping.set()
        if self._task is not None:
            await self._task
        try:
            await self.executor.run(sign_off, self.node, self.tally)
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("LMTP heartbeat: could not sign %s off (%s)", self.node, error)


def beat(node: str, tally: figures.DeliveryTally, interval: float) -> None:
    now = timezone.now()
    with tally.pending() as waiting, transaction.atomic():
        LmtpNode.objects.update_or_create(
            name=node,
            defaults={"heartbeat_at": now},
            create_defaults={"started_at": now, "heartbeat_at": now},
        )
        if waiting:
            figures.add_deliveries([], [], waiting)
        LmtpNode.objects.filter(heartbeat_at__lt=now - stale_after(interval)).delete()


def sign_off(node: str, tally: figures.DeliveryTally) -> None:
    with tally.pending() as waiting, transaction.atomic():
        if waiting:
            figures.add_deliveries([], [], waiting)
        LmtpNode.objects.filter(name=node).delete()
