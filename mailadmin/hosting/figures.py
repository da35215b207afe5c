"""Hourly figures: pruned session history and delivery outcomes, summed per hour and domain.

Two writers, each adding to counters in a write it makes anyway:

* ``prunehistory`` adds the sessions and failed logins it deletes to :class:`HourlyFigures`, in
  the transaction that deletes them (:func:`roll_up_sessions`, :func:`roll_up_failures`). The
  rule: a row is counted exactly once, either in the figures or still in its table; a batch
  that rolls back leaves both as they were, so running the prune again never counts twice.
* Delivery adds stored copies and refusals to :class:`DeliveryFigures` inside its group
  commit's transaction (or, for a lone copy on PostgreSQL, the one statement that stores it);
  refusals made outside one (at RCPT, of a message too large) wait in a per-process
  :class:`DeliveryTally` for the next commit or runlmtp's next heartbeat.

Both add with ``INSERT ... ON CONFLICT DO UPDATE`` (SQLite and PostgreSQL alike), one statement
per partial unique index; delivery rows go in sorted, so concurrent deliveries lock the same
rows in the same order. Hours are UTC.
"""

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.models import Count, DateTimeField, Func, QuerySet, Sum, Value
from django.utils import timezone

from mailadmin.hosting.store import fastsql
from mailadmin.models import AuthFailure, DeliveryFigures, Domain, HourlyFigures, Pop3Session

SESSION_COLUMNS = ("sessions", "logins", "failed_logins", "retr_messages", "retr_bytes")
DELIVERY_COLUMNS = ("messages", "size_bytes")
# Distinct recipient domains a tally keeps apart between flushes; past this, refusals for
# further domains (names come from the network) count under no domain, so memory stays bounded.
TALLY_MAX_DOMAINS = 1000

# UTC hour -> column -> amount
HourlyCounts = dict[datetime, Counter]
# A drained tally: (UTC hour, recipient domain name or None, outcome) -> messages
DeliveryCounts = Counter


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class UtcHour(Func):
    """A time column truncated to its UTC hour, for grouping rows by hour in the database.

    Not ``Trunc``: on SQLite that is a Python function called once per row, and a week of
    session rows (a few hundred thousand) then takes seconds. SQLite keeps times as UTC text,
    so the hour is its first 13 characters, written back as Django writes a time.
    """

    output_field = DateTimeField()

    def as_sqlite(self, compiler, connection, **extra):
        template = "(substr(%(expressions)s, 1, 13) || ':00:00')"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_postgresql(self, compiler, connection, **extra):
        template = "(date_trunc('hour', %(expressions)s AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
        return self.as_sql(compiler, connection, template=template, **extra)


# --- Session history: read by the hour, rolled up as it is pruned -----------------------------


def session_counts(sessions: QuerySet) -> HourlyCounts:
    """The figures of ``sessions`` per UTC hour of ``started_at``, for a reader of a window of
    rows (grouped by time alone, so the window is read through the time index)."""
    rows = _per_hour(sessions, "started_at", by_domain=False).annotate(
        sessions=Count("pk"),
        logins=Count("authenticated_at"),
        retr_messages=Sum("retr_count"),
        retr_bytes=Sum("retr_bytes"),
    )
    return {row["hour"]: Counter({name: row.get(name) or 0 for name in SESSION_COLUMNS}) for row in rows}


def failure_counts(failures: QuerySet) -> HourlyCounts:
    """Failed logins per UTC hour of ``created_at``, as :func:`session_counts`."""
    rows = _per_hour(failures, "created_at", by_domain=False).annotate(failed_logins=Count("pk"))
    return {row["hour"]: Counter(failed_logins=row["failed_logins"]) for row in rows}


def _per_hour(rows: QuerySet, time_field: str, by_domain: bool) -> QuerySet:
    keys = ("hour", "domain_id") if by_domain else ("hour",)
    return rows.order_by().annotate(hour=UtcHour(time_field)).values(*keys)


def roll_up_sessions(rows: list[tuple]) -> None:
    """Add these session rows, (id, domain id) pairs, to the figures; call in the transaction
    that deletes them."""
    _roll_up(
        Pop3Session,
        rows,
        "started_at",
        sessions=Count("pk"),
        logins=Count("authenticated_at"),
        failed_logins=Value(0),
        retr_messages=Sum("retr_count"),
        retr_bytes=Sum("retr_bytes"),
    )


def roll_up_failures(rows: list[tuple]) -> None:
    """Add these failed-login rows, (id, domain id) pairs, to the figures; call in the
    transaction that deletes them."""
    nothing = Value(0)
    _roll_up(
        AuthFailure,
        rows,
        "created_at",
        sessions=nothing,
        logins=nothing,
        failed_logins=Count("pk"),
        retr_messages=nothing,
        retr_bytes=nothing,
    )


def _roll_up(model, rows: list[tuple], time_field: str, **amounts) -> None:
    """Sum ``rows`` per hour and domain into the figures with ``INSERT ... SELECT``: the rows
    never leave the database, which keeps a prune batch (and the write lock) short. Rows with
    a domain and rows without go in one statement each (each meets its own unique index)."""
    for with_domain in (True, False):
        ids = [pk for pk, domain_id in rows if (domain_id is not None) == with_domain]
        if not ids:
            continue
        sums = (
            _per_hour(model.objects.filter(pk__in=ids), time_field, by_domain=True)
            .annotate(**amounts)
            .values_list("hour", "domain_id", *SESSION_COLUMNS)
        )
        select, params = sums.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(
                fastsql.counter_upsert_sql(
                    HourlyFigures, ("hour",), SESSION_COLUMNS, select, with_domain=with_domain
                ),
                params,
            )


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
        """The counts so far, taken out of the tally, and put back if the block writing them fails
        before its commit (an error raised after it says ``committed``: the counts are written)."""
        counts = self.drain()
        try:
            yield counts
        except BaseException as error:
            if not getattr(error, "committed", False):
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
    rows = sorted(rows, key=lambda row: (row[0], row[1] is None, row[1] or 0, row[2][:key_values]))
    width = 1 + len(key) + len(columns)  # hour, domain id, the rest of the key, the amounts
    for with_domain in (True, False):
        chosen = [row for row in rows if (row[1] is not None) == with_domain]
        if not chosen:
            continue
        params = [
            value
            for hour, domain_id, values in chosen
            for value in (connection.ops.adapt_datetimefield_value(hour), domain_id, *values)
        ]
        rows_sql = f"VALUES {fastsql.values_sql(len(chosen), width)}"
        with fastsql.prepared_cursor() as cursor:
            cursor.execute(
                fastsql.counter_upsert_sql(model, key, columns, rows_sql, with_domain=with_domain), params
            )
