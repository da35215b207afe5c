"""Hourly figures: pruned session history and delivery outcomes, summed per hour and domain.

Two writers, each adding to counters in a write it makes anyway:

* ``prunehistory`` adds the sessions and failed logins it deletes to :class:`HourlyFigures`, in
  the transaction that deletes them (:func:`roll_up_sessions`, :func:`roll_up_failures`). The
  rule: a row is counted exactly once, either in the figures or still in its table; a batch
  that rolls back leaves both as they were, so running the prune again never counts twice.
* Delivery adds stored copies and refusals to :class:`DeliveryFigures` inside its group
  commit's transaction; refusals made outside one (at RCPT, of a message too large) wait in a
  per-process :class:`DeliveryTally` for the next commit or runlmtp's next heartbeat.

Both add with one ``INSERT ... ON CONFLICT DO UPDATE`` per table (SQLite and PostgreSQL alike),
keys sorted, so concurrent writers lock the same rows in the same order. Hours are UTC.
"""

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from mailadmin.models import AuthFailure, DeliveryFigures, Domain, HourlyFigures, Pop3Session

SESSION_COLUMNS = ("sessions", "logins", "failed_logins", "retr_messages", "retr_bytes")
DELIVERY_COLUMNS = ("messages", "size_bytes")
# Distinct recipient domains a tally keeps apart between flushes; past this, refusals for
# further domains (names come from the network) count under no domain, so memory stays bounded.
TALLY_MAX_DOMAINS = 1000

# (hour, domain id or None) -> column -> amount
HourlyCounts = dict[tuple[datetime, int | None], Counter]
# (hour, domain id or None, outcome) -> [messages, bytes]
DeliveryCounts = Counter


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def utc_hour(field: str) -> Trunc:
    return Trunc(field, "hour", tzinfo=UTC)


# --- Session history: rolled up as it is pruned -----------------------------------------------


def session_counts(sessions: QuerySet) -> HourlyCounts:
    """The figures of ``sessions``, per UTC hour of ``started_at`` and domain."""
    rows = (
        sessions.order_by()
        .annotate(hour=utc_hour("started_at"))
        .values("hour", "domain_id")
        .annotate(
            sessions=Count("pk"),
            logins=Count("pk", filter=Q(authenticated_at__isnull=False)),
            retr_messages=Sum("retr_count"),
            retr_bytes=Sum("retr_bytes"),
        )
    )
    return {
        (row["hour"], row["domain_id"]): Counter({name: row.get(name) or 0 for name in SESSION_COLUMNS})
        for row in rows
    }


def failure_counts(failures: QuerySet) -> HourlyCounts:
    """Failed logins per UTC hour of ``created_at`` and domain."""
    rows = (
        failures.order_by()
        .annotate(hour=utc_hour("created_at"))
        .values("hour", "domain_id")
        .annotate(failed_logins=Count("pk"))
    )
    return {(row["hour"], row["domain_id"]): Counter(failed_logins=row["failed_logins"]) for row in rows}


def roll_up_sessions(ids: list) -> None:
    """Add these session rows to the figures; call in the transaction that deletes them."""
    add_hourly(session_counts(Pop3Session.objects.filter(pk__in=ids)))


def roll_up_failures(ids: list) -> None:
    """Add these failed-login rows to the figures; call in the transaction that deletes them."""
    add_hourly(failure_counts(AuthFailure.objects.filter(pk__in=ids)))


def add_hourly(counts: HourlyCounts) -> None:
    rows = [
        (hour, domain_id, [amounts[name] for name in SESSION_COLUMNS])
        for (hour, domain_id), amounts in counts.items()
    ]
    _add(HourlyFigures, ("hour",), SESSION_COLUMNS, rows)


def prune_figures(days: int) -> int:
    """Delete figures of hours older than ``days`` days; a few thousand rows a day at most."""
    cutoff = timezone.now() - timedelta(days=days)
    hourly, _ = HourlyFigures.objects.filter(hour__lt=cutoff).delete()
    deliveries, _ = DeliveryFigures.objects.filter(hour__lt=cutoff).delete()
    return hourly + deliveries


# --- Deliveries -------------------------------------------------------------------------------


class DeliveryTally:
    """Refusals counted in one process until a transaction it makes anyway writes them.

    Thread-safe: the event loop adds, a database thread drains. Keys are (UTC hour, recipient
    domain name or None, outcome); the domain names become ids when written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._domains: set[str] = set()

    def add(self, domain_name: str | None, outcome: str, messages: int = 1) -> None:
        with self._lock:
            if domain_name is not None and domain_name not in self._domains:
                if len(self._domains) >= TALLY_MAX_DOMAINS:
                    domain_name = None
                else:
                    self._domains.add(domain_name)
            self._counts[(hour_of(timezone.now()), domain_name, outcome)] += messages

    def drain(self) -> Counter:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            self._domains = set()
        return counts

    @contextmanager
    def pending(self) -> Iterator[Counter]:
        """The counts so far, taken out of the tally, and put back if the block writing them fails."""
        counts = self.drain()
        try:
            yield counts
        except BaseException:
            self.restore(counts)
            raise

    def restore(self, counts: Mapping) -> None:
        """Put drained counts back: the transaction meant to write them did not."""
        with self._lock:
            self._counts.update(counts)
            self._domains.update(name for _, name, _ in counts if name is not None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._counts)


def add_deliveries(
    copies: Iterable[tuple[int | None, int]],
    refusals: Iterable[tuple[int | None, str]],
    refused_elsewhere: Mapping,
) -> None:
    """Count stored copies ``(domain id, bytes)``, refusals ``(domain id, outcome)`` of this hour,
    and a drained tally; in the caller's transaction."""
    hour = hour_of(timezone.now())
    counts: dict[tuple, list[int]] = {}
    for domain_id, size_bytes in copies:
        total = counts.setdefault((hour, domain_id, DeliveryFigures.DELIVERED), [0, 0])
        total[0] += 1
        total[1] += size_bytes
    for domain_id, outcome in refusals:
        counts.setdefault((hour, domain_id, outcome), [0, 0])[0] += 1
    domain_ids = _domain_ids({name for _, name, _ in refused_elsewhere if name is not None})
    for (tallied_hour, name, outcome), messages in refused_elsewhere.items():
        counts.setdefault((tallied_hour, domain_ids.get(name), outcome), [0, 0])[0] += messages
    rows = [(h, domain_id, [outcome, *amounts]) for (h, domain_id, outcome), amounts in counts.items()]
    _add(DeliveryFigures, ("hour", "outcome"), DELIVERY_COLUMNS, rows, key_values=1)


def _domain_ids(names: set[str]) -> dict[str, int]:
    if not names:
        return {}
    return dict(Domain.objects.filter(name__in=names).values_list("name", "pk"))


def _add(
    model, key: tuple[str, ...], columns: tuple[str, ...], rows: list[tuple], key_values: int = 0
) -> None:
    """Add ``rows`` (hour, domain id, [extra key values..., amounts...]) to ``model``'s counters.

    One upsert for the rows with a domain and one for those without: each has its own partial
    unique index (a NULL never conflicts in a plain one). Sorted, so two writers adding to the
    same rows lock them in one order (PostgreSQL), and never deadlock on each other.
    """
    table = connection.ops.quote_name(model._meta.db_table)
    rows = sorted(rows, key=lambda row: (row[0], row[1] is None, row[1] or 0, row[2][:key_values]))
    all_columns = ("hour", "domain_id", *key[1:], *columns)
    increments = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in columns)
    for with_domain in (True, False):
        chosen = [row for row in rows if (row[1] is not None) == with_domain]
        if not chosen:
            continue
        target = ", ".join(("hour", "domain_id", *key[1:]) if with_domain else key)
        condition = "domain_id IS NOT NULL" if with_domain else "domain_id IS NULL"
        placeholders = ", ".join(["(" + ", ".join(["%s"] * len(all_columns)) + ")"] * len(chosen))
        params = [
            value
            for hour, domain_id, values in chosen
            for value in (connection.ops.adapt_datetimefield_value(hour), domain_id, *values)
        ]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(all_columns)}) VALUES {placeholders} "
                f"ON CONFLICT ({target}) WHERE {condition} DO UPDATE SET {increments}",
                params,
            )
