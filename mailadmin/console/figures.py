"""The figures the dashboard, the charts and /metrics show, read from the shared database.

Every figure is scoped with ``scopes.visible_to``: a domain administrator's cover their domains
only. Each is one query over an index and a bounded window (the last hour, today, seven days),
or over a table bounded by what is hosted (mailboxes, domains); none reads all the history.

An hour's session figures are the rows ``prunehistory`` rolled up into
:class:`~mailadmin.models.HourlyFigures` plus that hour's rows not yet pruned: each row is in
exactly one of the two (``mailadmin.hosting.figures``), so the sum is exact whenever it is read.
"""

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Case, Count, F, IntegerField, Sum, When
from django.utils import timezone

from mailadmin.hosting import figures, scopes
from mailadmin.hosting.actors import Actor
from mailadmin.models import (
    AuthFailure,
    DeliveryFigures,
    Domain,
    HourlyFigures,
    LmtpNode,
    Mailbox,
    Pop3Node,
    Pop3Session,
)
from mailadmin.pop3d.registry import stale_after

NEAR_FULL_PERCENT = 80
HISTOGRAM_STEP_PERCENT = 10
CHART_DAYS = 7


@dataclass(frozen=True)
class Dashboard:
    open_sessions: int
    logins_last_hour: int
    failed_logins_last_hour: int
    retrieved_bytes_today: int
    mailboxes_near_full: int
    domains_near_cap: int
    # None for a domain administrator: the servers are every domain's.
    processes: dict[str, int] | None


def dashboard(actor: Actor, now: datetime | None = None) -> Dashboard:
    now = now or timezone.now()
    hour_ago = now - timedelta(hours=1)
    sessions = scopes.visible_to(actor, Pop3Session)
    return Dashboard(
        open_sessions=open_sessions(actor),
        logins_last_hour=sessions.filter(started_at__gte=hour_ago, authenticated_at__isnull=False).count(),
        failed_logins_last_hour=scopes.visible_to(actor, AuthFailure)
        .filter(created_at__gte=hour_ago)
        .count(),
        retrieved_bytes_today=retrieved_bytes_since(actor, start_of_day(now)),
        mailboxes_near_full=near_full(scopes.visible_to(actor, Mailbox)).count(),
        domains_near_cap=near_full(scopes.visible_to(actor, Domain)).count(),
        processes=alive_processes(now) if actor.all_domains else None,
    )


def start_of_day(moment: datetime) -> datetime:
    return timezone.localtime(moment).replace(hour=0, minute=0, second=0, microsecond=0)


def near_full(rows):
    """Mailboxes or domains with a byte quota, using at least NEAR_FULL_PERCENT of it."""
    return rows.filter(quota_bytes__gt=0, used_bytes__gte=F("quota_bytes") * NEAR_FULL_PERCENT / 100)


def retrieved_bytes_since(actor: Actor, since: datetime) -> int:
    """Bytes RETRieved in sessions started since ``since``: rolled-up hours plus remaining rows."""
    rows = scopes.visible_to(actor, Pop3Session).filter(started_at__gte=since)
    rolled_up = scopes.visible_to(actor, HourlyFigures).filter(hour__gte=since)
    live = rows.aggregate(total=Sum("retr_bytes"))["total"] or 0
    return live + (rolled_up.aggregate(total=Sum("retr_bytes"))["total"] or 0)


def alive_processes(now: datetime | None = None) -> dict[str, int]:
    """runpop3 and runlmtp processes whose heartbeat is fresh; a dead one drops out once it lapses."""
    now = now or timezone.now()
    pop3_since = now - stale_after(settings.POP3_MONITOR_INTERVAL)
    lmtp_since = now - stale_after(settings.LMTP_HEARTBEAT_INTERVAL)
    return {
        "runpop3": Pop3Node.objects.filter(heartbeat_at__gte=pop3_since).count(),
        "runlmtp": LmtpNode.objects.filter(heartbeat_at__gte=lmtp_since).count(),
    }


# --- Hourly series ---------------------------------------------------------------------------


def hourly(actor: Actor, since: datetime) -> dict[datetime, Counter]:
    """Session figures per UTC hour from ``since`` (an hour boundary) on, for ``actor``'s domains."""
    totals: dict[datetime, Counter] = {}

    def add(counts: figures.HourlyCounts) -> None:
        for hour, amounts in counts.items():
            totals.setdefault(hour, Counter()).update(amounts)

    add(figures.session_counts(scopes.visible_to(actor, Pop3Session).filter(started_at__gte=since)))
    add(figures.failure_counts(scopes.visible_to(actor, AuthFailure).filter(created_at__gte=since)))
    rolled_up = scopes.visible_to(actor, HourlyFigures).filter(hour__gte=since).values("hour")
    for row in rolled_up.annotate(**{name: Sum(name) for name in figures.SESSION_COLUMNS}):
        totals.setdefault(row["hour"], Counter()).update(
            {name: row[name] for name in figures.SESSION_COLUMNS}
        )
    return totals


def chart_hours(now: datetime, days: int = CHART_DAYS) -> list[datetime]:
    """The UTC hours of the last ``days`` days, oldest first, the current one last."""
    last = figures.hour_of(now)
    return [last - timedelta(hours=n) for n in range(days * 24 - 1, -1, -1)]


def per_day(
    series: dict[datetime, Counter], hours: list[datetime], column: str
) -> list[tuple[datetime, int]]:
    """A column summed per local day over ``hours``, oldest day first."""
    days: dict[datetime, int] = {}
    for hour in hours:
        day = start_of_day(hour)
        days[day] = days.get(day, 0) + series.get(hour, Counter())[column]
    return list(days.items())


def quota_histogram(actor: Actor) -> list[tuple[int, int]]:
    """(lower bound in %, mailboxes) per HISTOGRAM_STEP_PERCENT of byte quota used; 100 holds
    every mailbox at or over its quota. Mailboxes without a quota are left out."""
    step = HISTOGRAM_STEP_PERCENT
    bucket = Case(
        When(used_bytes__gte=F("quota_bytes"), then=100),
        *(
            When(used_bytes__gte=F("quota_bytes") * lower / 100, then=lower)
            for lower in range(100 - step, 0, -step)
        ),
        default=0,
        output_field=IntegerField(),
    )
    rows = (
        scopes.visible_to(actor, Mailbox)
        .filter(quota_bytes__gt=0)
        .order_by()
        .annotate(bucket=bucket)
        .values("bucket")
        .annotate(mailboxes=Count("pk"))
    )
    found = {row["bucket"]: row["mailboxes"] for row in rows}
    return [(lower, found.get(lower, 0)) for lower in range(0, 101, step)]


# --- Deliveries ------------------------------------------------------------------------------


def deliveries_since(actor: Actor, since: datetime) -> dict[str, tuple[int, int]]:
    """outcome -> (messages, bytes) counted from the hour of ``since`` on."""
    rows = (
        scopes.visible_to(actor, DeliveryFigures)
        .filter(hour__gte=figures.hour_of(since))
        .values("outcome")
        .annotate(messages=Sum("messages"), size_bytes=Sum("size_bytes"))
    )
    return {row["outcome"]: (row["messages"], row["size_bytes"]) for row in rows}


def session_totals_since(actor: Actor, since: datetime) -> Counter:
    """Session figures (and failed logins) from ``since`` on, rolled-up hours included."""
    total = Counter()
    for amounts in hourly(actor, since).values():
        total.update(amounts)
    return total


def domain_usage(actor: Actor) -> list[tuple[str, int, int]]:
    """(domain, used bytes, quota bytes) for every domain ``actor`` may see."""
    return list(
        scopes.visible_to(actor, Domain).order_by("name").values_list("name", "used_bytes", "quota_bytes")
    )


def open_sessions(actor: Actor) -> int:
    return scopes.visible_to(actor, Pop3Session).open().count()
