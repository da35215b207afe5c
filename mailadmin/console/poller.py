"""The embedded doorbell: without a channel layer that crosses processes, one task per daphne
process reads the session rows changed since its last look and tells the pages of that process.

It runs only while a page is connected: the first live sessions consumer starts it, the last
one to leave stops it. With Redis, runpop3 rings the bell itself and no poller runs.
"""

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

from channels.layers import get_channel_layer
from django.db.models import Max

from mailadmin.console.database import console_database
from mailadmin.executors import TRANSIENT_DB_ERRORS
from mailadmin.models import Pop3Session
from mailadmin.pop3d import feed

logger = logging.getLogger("mailadmin.console")

# A look every POLL_SECONDS on the wall clock's beat, LOOK_AFTER_TICK seconds after runpop3's
# monitors tick (``feed.seconds_to_beat``), when their rows are likely committed: a login then
# reaches an open page about a look after the tick that wrote it.
POLL_SECONDS = 0.5
LOOK_AFTER_TICK = 0.15
# A write is stamped (database time) when its statement runs but seen only once its transaction
# commits: each read looks this far behind the newest stamp seen, and skips rows already told.
OVERLAP = timedelta(seconds=2)
# Rows read at most per look (a few small columns each); when more changed within OVERLAP, the
# notice names none, and every page re-reads its own rows.
READ_LIMIT = 2000


class ChangeReader:
    """Reads the session rows changed since its last read; one sync unit per call."""

    def __init__(self) -> None:
        self.watermark: datetime | None = None  # the newest updated_at seen
        self.told: dict[str, datetime] = {}  # rows within OVERLAP of it, as already announced

    def read(self) -> dict | None:
        """A notice about the rows changed since the last read, or None if none did."""
        if self.watermark is None:
            latest = Pop3Session.objects.aggregate(latest=Max("updated_at"))["latest"]
            self.watermark = latest or datetime.min.replace(tzinfo=UTC) + OVERLAP
        changed = list(
            Pop3Session.objects.changed_since(self.watermark - OVERLAP)
            .order_by("-updated_at")
            .values_list("updated_at", *feed.NOTICE_FIELDS)[: READ_LIMIT + 1]
        )
        if not changed:
            return None
        self.watermark = max(self.watermark, changed[0][0])
        fresh = [row for row in changed if self.told.get(str(row[1])) != row[0]]
        horizon = self.watermark - OVERLAP
        self.told = {str(pk): updated_at for updated_at, pk, *_ in changed if updated_at > horizon}
        if len(changed) > READ_LIMIT:
            return feed.notice(None)
        if not fresh:
            return None
        return feed.notice([feed.notice_row(*values) for _, *values in fresh])


class SessionPoller:
    """The one poller of this process, running while pages subscribe."""

    def __init__(self) -> None:
        self._subscribers = 0
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self) -> None:
        if feed.layer_crosses_processes():
            return
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            self._task, self._subscribers = None, 0  # left behind by a loop that has ended
        self._subscribers += 1
        if self._task is None:
            self._task = loop.create_task(self._run())

    def unsubscribe(self) -> None:
        if feed.layer_crosses_processes() or self._subscribers == 0:
            return
        self._subscribers -= 1
        if self._subscribers == 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        layer = get_channel_layer()
        reader = ChangeReader()
        while True:
            try:
                message = await console_database.run(reader.read)
            except TRANSIENT_DB_ERRORS as error:
                logger.warning("live sessions: cannot read the session rows (%s); retrying", error)
                message = None
            except Exception:
                logger.exception("live sessions: reading the session rows failed")
                message = None
            if message is not None:
                await layer.group_send(feed.SESSIONS_GROUP, message)
            await asyncio.sleep(feed.seconds_to_beat(POLL_SECONDS, time.time(), after=LOOK_AFTER_TICK))


session_poller = SessionPoller()
