"""The live sessions page's websocket: a snapshot of the page's rows, then their changes.

The database is the truth: a page gets its rows from the database when it connects (or
reconnects, or asks for another search or page), and again whenever a notice on the sessions
group (``mailadmin.pop3d.feed``) concerns it, at most once per ``MIN_SECONDS_BETWEEN_UPDATES``,
and every ``RESYNC_SECONDS`` besides, which catches notices lost on the way and processes that
stopped heartbeating. It sends only what differs from what the page already shows.

Messages from the page: ``{"action": "view", "search": TEXT, "page": N}``. To the page:
``{"type": "page", "rows": [...], "total", "page", "pages"}`` (replace everything), and
``{"type": "changes", "upsert": [...], "remove": [ids], "order": [ids], "total", "page",
"pages"}``. Kicking is a POST to the page's kick URL, where CSRF is checked.
"""

import asyncio
import logging
from contextlib import suppress

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from mailadmin.console.database import console_database
from mailadmin.console.poller import session_poller
from mailadmin.console.sessions import Page, View, read_page
from mailadmin.executors import TRANSIENT_DB_ERRORS
from mailadmin.hosting.actors import Actor
from mailadmin.pop3d import feed

logger = logging.getLogger("mailadmin.console")

VIEW_PERMISSION = "mailadmin.view_pop3session"
MIN_SECONDS_BETWEEN_UPDATES = 1.0
RESYNC_SECONDS = 10.0
# Close codes (4000-4999 are the application's): the page does not retry these.
CLOSE_NOT_ALLOWED = 4403


def actor_if_allowed(user, client_address: str) -> Actor | None:
    """The actor of a staff user who may view sessions; None for anyone else."""
    if not (user.is_authenticated and user.is_active and user.is_staff and user.has_perm(VIEW_PERMISSION)):
        return None
    return Actor.for_user(user, client_address)


class LiveSessionsConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.actor = None
        user = self.scope.get("user")
        client = self.scope.get("client") or ("", 0)
        if user is not None:
            self.actor = await console_database.run(actor_if_allowed, user, client[0])
        if self.actor is None:
            await self.close(code=CLOSE_NOT_ALLOWED)
            return
        self.view = View()
        self.shown = Page()
        self.changed = asyncio.Event()
        self.sending = asyncio.Lock()
        await self.channel_layer.group_add(feed.SESSIONS_GROUP, self.channel_name)
        await self.accept()
        session_poller.subscribe()
        await self.send_page()
        self.follower = asyncio.get_running_loop().create_task(self.follow())

    async def disconnect(self, code: int) -> None:
        if self.actor is None:
            return
        if hasattr(self, "follower"):
            self.follower.cancel()
            with suppress(asyncio.CancelledError):
                await self.follower
        session_poller.unsubscribe()
        await self.channel_layer.group_discard(feed.SESSIONS_GROUP, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        if isinstance(content, dict) and content.get("action") == "view":
            self.view = View.from_request(content.get("search"), content.get("page"))
            await self.send_page()

    async def sessions_changed(self, message: dict) -> None:
        """A notice from the sessions group; the rows are read again if it concerns this page."""
        rows = message.get("rows")
        shown = {row["id"] for row in self.shown.rows}
        if rows is None or any(self.concerns(row, shown) for row in rows):
            self.changed.set()

    def concerns(self, row: dict, shown: set[str]) -> bool:
        if row["id"] in shown:
            return True
        return self.actor.may_see_domain(row["domain"]) and self.view.matches(
            row["username"], row["peer_host"]
        )

    async def follow(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), RESYNC_SECONDS)
            self.changed.clear()
            # Updates at most a second apart from start to start, not a second after each ends:
            # the page then keeps to the beat of the ticks and looks (``feed.seconds_to_beat``).
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                await self.send_changes()
            except TRANSIENT_DB_ERRORS as error:
                logger.warning("live sessions: cannot read the session rows (%s); retrying", error)
            await asyncio.sleep(max(0.0, started + MIN_SECONDS_BETWEEN_UPDATES - loop.time()))

    async def send_page(self) -> None:
        async with self.sending:
            self.shown = await console_database.run(read_page, self.actor, self.view)
            await self.send_json({"type": "page", "rows": self.shown.rows, **self.shown.summary()})

    async def send_changes(self) -> None:
        async with self.sending:
            page = await console_database.run(read_page, self.actor, self.view)
            changes = differences(self.shown, page)
            self.shown = page
            if changes is not None:
                await self.send_json({"type": "changes", **changes, **page.summary()})


def differences(before: Page, after: Page) -> dict | None:
    """What turns the page ``before`` into ``after``; None when they are the same."""
    if before == after:
        return None
    old = {row["id"]: row for row in before.rows}
    new_ids = {row["id"] for row in after.rows}
    return {
        "upsert": [row for row in after.rows if old.get(row["id"]) != row],
        "remove": [row_id for row_id in old if row_id not in new_ids],
        "order": [row["id"] for row in after.rows],
    }
