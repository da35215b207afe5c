"""Notices of changed POP3 session rows: the doorbell the live sessions page listens to.

The database is the truth. A notice only names the rows that changed (id, domain, login name
and client address, enough for a page to tell whether a change concerns it); a page that cares
reads the rows themselves. Two processes ring the bell:

* with a channel layer that crosses processes (``REDIS_URL``), each runpop3 process publishes a
  notice after every monitor tick that wrote session rows, fire-and-forget: one publish at a
  time, each given up after ``PUBLISH_TIMEOUT_SECONDS``, so a Redis outage never stalls a
  session, and the pages' periodic re-read catches up with what was lost;
* with the in-memory layer, which never leaves its process, one poller inside each daphne
  process reads the rows changed since its last look (``mailadmin.console.poller``).
"""

import asyncio
import logging
from collections.abc import Iterable

from django.conf import settings
from django.db.models import QuerySet

from mailadmin.models import Pop3Session

logger = logging.getLogger("mailadmin.pop3")

SESSIONS_GROUP = "pop3-sessions"
NOTICE_TYPE = "sessions.changed"
# A notice about more rows than this names none ("anything may have changed"): every page then
# re-reads its rows. Keeps each message small whatever the churn.
MAX_NOTICE_ROWS = 200
PUBLISH_TIMEOUT_SECONDS = 0.5
IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"


def seconds_to_beat(period: float, now: float, *, after: float = 0.0) -> float:
    """Seconds from ``now`` (wall-clock seconds) to the next instant ``after`` seconds past a
    multiple of ``period`` (more than 0).

    runpop3's monitor ticks on this beat in every process and on every host (the clocks kept by
    NTP), and the pollers look just after it: a login then waits for one tick and reaches an
    open page a look later. With each process ticking on a clock of its own, the wait for the
    tick, for the look and for the page's next update added up (bench live_page, PostgreSQL,
    logins at random moments: p95 1.84-2.04 s, against 1.45-1.62 s on the beat).
    """
    return (after - now) % period


def layer_crosses_processes() -> bool:
    """True when runpop3 can reach the web processes through the channel layer (Redis)."""
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    return bool(backend) and backend != IN_MEMORY_LAYER


def notice(rows: list[dict] | None) -> dict:
    """A channel-layer message about ``rows`` (as ``notice_rows`` gives them); None: about any row."""
    if rows is not None and len(rows) > MAX_NOTICE_ROWS:
        rows = None
    return {"type": NOTICE_TYPE, "rows": rows}


def merged(first: dict, second: dict) -> dict:
    if first["rows"] is None or second["rows"] is None:
        return notice(None)
    return notice(first["rows"] + second["rows"])


# What a notice tells of each row, in this order (see notice_row).
NOTICE_FIELDS = ("pk", "domain_id", "username", "peer_host")


def notice_row(pk, domain_id: int | None, username: str, peer_host: str) -> dict:
    return {"id": str(pk), "domain": domain_id, "username": username, "peer_host": peer_host}


def notice_rows(sessions: QuerySet[Pop3Session]) -> list[dict]:
    return [notice_row(*values) for values in sessions.values_list(*NOTICE_FIELDS)]


def notice_about(session_ids: Iterable[str], anything: bool = False) -> dict | None:
    """The notice for the sessions named (read back after their writes), or None if none changed.

    ``anything``: rows changed that cannot be named cheaply (a sweep of lost sessions).
    """
    session_ids = list(session_ids)
    if anything or len(session_ids) > MAX_NOTICE_ROWS:
        return notice(None)
    if not session_ids:
        return None
    return notice(notice_rows(Pop3Session.objects.filter(pk__in=session_ids)))


class SessionPublisher:
    """Publishes notices from runpop3, at most one in flight and one waiting (merged)."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self._waiting: dict | None = None
        self._task: asyncio.Task | None = None
        self._failing = False

    def send(self, message: dict) -> None:
        self._waiting = message if self._waiting is None else merged(self._waiting, message)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def settle(self) -> None:
        """Wait for what is queued to be published or given up (each try is time-bounded)."""
        if self._task is not None:
            await self._task

    async def _drain(self) -> None:
        while self._waiting is not None:
            message, self._waiting = self._waiting, None
            await self._publish(message)

    async def _publish(self, message: dict) -> None:
        try:
            await asyncio.wait_for(self.layer.group_send(SESSIONS_GROUP, message), PUBLISH_TIMEOUT_SECONDS)
        except Exception as error:  # noqa: BLE001  whatever the layer raises, sessions go on
            if not self._failing:
                logger.warning("live session notices are not getting through (%r); retrying", error)
            self._failing = True
            return
        if self._failing:
            logger.info("live session notices get through again")
        self._failing = False
