"""The live sessions page's rows: the open sessions of running runpop3 processes, page by page.

A session counts as open while its row has no end and its process heartbeats: the sessions of
a process that died leave the page once its heartbeat is as old as the sweep that marks them
lost waits for (``registry.stale_after``), even before another process sweeps them.
"""

from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Window
from django.utils import timezone

from mailadmin.hosting import scopes
from mailadmin.hosting.actors import Actor
from mailadmin.models import Pop3Node, Pop3Session
from mailadmin.pop3d.registry import stale_after
from mailadmin.units import format_size

# Rows on one page: what the browser holds, whatever the number of open sessions.
PAGE_SIZE = 100
MAX_SEARCH_LENGTH = 320  # an address
MAX_PAGE = 100_000

ROW_FIELDS = (
    "pk",
    "username",
    "peer_host",
    "peer_port",
    "tls_version",
    "node",
    "started_at",
    "authenticated_at",
    "kick_requested_at",
    "commands",
    "retr_count",
    "retr_bytes",
    "marked_count",
    "marked_bytes",
)


class State:
    """A session's state as the page names it (the page translates these codes)."""

    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    KICKING = "kicking"


@dataclass(frozen=True)
class View:
    """What a page looks at: a search over address and client address, and a page number."""

    search: str = ""
    page: int = 1

    @classmethod
    def from_request(cls, search: object, page: object) -> "View":
        search = search.strip()[:MAX_SEARCH_LENGTH] if isinstance(search, str) else ""
        try:
            number = min(max(1, int(page)), MAX_PAGE)
        except (TypeError, ValueError):
            number = 1
        return cls(search, number)

    def matches(self, username: str, peer_host: str) -> bool:
        """Whether a row with these values can be on this view (the search, in Python)."""
        needle = self.search.casefold()
        return not needle or needle in username.casefold() or needle in peer_host.casefold()


@dataclass(frozen=True)
class Page:
    rows: list[dict] = field(default_factory=list)
    total: int = 0
    number: int = 1
    pages: int = 1

    def summary(self) -> dict:
        return {"total": self.total, "page": self.number, "pages": self.pages}


def open_sessions(actor: Actor, search: str = "") -> QuerySet[Pop3Session]:
    """The open sessions ``actor`` may see, of processes that still heartbeat, matching ``search``."""
    cutoff = timezone.now() - stale_after(settings.POP3_MONITOR_INTERVAL)
    alive = Pop3Node.objects.filter(heartbeat_at__gte=cutoff).values("name")
    sessions = scopes.visible_to(actor, Pop3Session).open().filter(node__in=alive)
    if search:
        sessions = sessions.filter(Q(username__icontains=search) | Q(peer_host__icontains=search))
    return sessions


def read_page(actor: Actor, view: View) -> Page:
    """One page of rows, newest session first; a page past the end shows the last one.

    The total comes with the rows, from one statement (a window count), so the two agree even
    while sessions come and go.
    """
    sessions = (
        open_sessions(actor, view.search)
        .order_by("-started_at", "pk")
        .annotate(total=Window(Count("pk")))
        .values(*ROW_FIELDS, "total")
    )
    number = view.page
    while True:
        start = (number - 1) * PAGE_SIZE
        values = list(sessions[start : start + PAGE_SIZE])
        if values or number == 1:
            break
        number = pages_for(open_sessions(actor, view.search).count())
    total = values[0]["total"] if values else 0
    return Page([row_of(session) for session in values], total, number, pages_for(total))


def pages_for(total: int) -> int:
    return max(1, -(-total // PAGE_SIZE))


def row_of(session: dict) -> dict:
    """A session as the page shows it: strings and numbers only, ready for JSON."""
    if session["kick_requested_at"] is not None:
        state = State.KICKING
    elif session["authenticated_at"] is not None:
        state = State.TRANSACTION
    else:
        state = State.AUTHORIZATION
    return {
        "id": str(session["pk"]),
        "address": session["username"],
        "client": session["peer_host"],
        "client_port": session["peer_port"],
        "tls": session["tls_version"],
        "process": session["node"],
        "state": state,
        "since": session["started_at"].isoformat(),
        "commands": session["commands"],
        "retrieved": session["retr_count"],
        "retrieved_size": format_size(session["retr_bytes"]),
        "marked": session["marked_count"],
        "marked_size": format_size(session["marked_bytes"]),
    }
