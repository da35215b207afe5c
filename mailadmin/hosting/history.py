"""Session and failed-login history: kept for MAILADMIN_HISTORY_DAYS, then pruned in small batches.

One row per POP3 connection and one per failed login add up to millions within weeks. Pruning
deletes a bounded batch per transaction, so it never holds SQLite's writer lock, or
PostgreSQL's row locks, for long while runpop3 writes its rows; an open session is never
deleted, however old. Each batch is added to the hourly figures (``figures``) in the transaction
that deletes it, so the charts keep counting what went.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from mailadmin.collector import collection_paused
from mailadmin.hosting import figures
from mailadmin.hosting.commits import leaving_no_flush_to_others, letting_the_log_catch_up
from mailadmin.models import AuthFailure, Pop3Session

# A batch holds SQLite's writer lock, or PostgreSQL's row locks, for about this long: the next
# batch is sized from how long the last one took. A fixed size cannot suit both engines and
# every disk: 250 rows made runpop3's longest wait 107 ms on SQLite (bench, console_prune,
# 1,000,000 rows, quiet machine), where a faster disk or engine could take far more. The
# slowest batches take three times their aim (the CPU, a checkpoint's flush ahead in the
# disk's queue), and a writer may wait out a whole one and the checkpointer's turn after it:
# hence well under 100 ms. On a copy of the bench's database (1,099,000 rows) 20 ms batches of
# up to 5,000 rows made the longest wait 83.5 ms, 10 ms of up to 1,000 rows 54.5 ms.
BATCH_SECONDS = 0.01
FIRST_BATCH_SIZE = 100
MIN_BATCH_SIZE, MAX_BATCH_SIZE = 10, 1000
# After each batch the prune waits as long as the batch took (up to this): a writer waiting
# for the lock (runpop3's monitor, on SQLite polling for the writer lock every half
# millisecond) gets in, instead of losing every race to the prune's next batch and waiting
# out its busy timeout. The lock is then free at least half of the prune's time.
MAX_PAUSE_SECONDS = 0.1


@dataclass(frozen=True)
class Pruned:
    sessions: int
    failures: int
    figures: int = 0  # hourly figure rows older than MAILADMIN_FIGURES_DAYS


def prune_history(days: int, *, batch_size: int | None = None) -> Pruned:
    """Delete sessions that ended, and failed logins made, more than ``days`` days ago, adding
    them to the hourly figures as they go; and figures older than MAILADMIN_FIGURES_DAYS.

    Batches are sized to take about BATCH_SECONDS each, unless ``batch_size`` fixes their size."""
    if days < 0:
        raise ValueError("days must be 0 or more")
    cutoff = timezone.now() - timedelta(days=days)
    # A session that ended before the cutoff started before it: the started_at index finds them.
    ended = Pop3Session.objects.filter(started_at__lt=cutoff, ended_at__lt=cutoff)
    failed = AuthFailure.objects.filter(created_at__lt=cutoff)
    # Old figures go first: what this run rolls up stays, however old, until the next run.
    with transaction.atomic():
        old_figures = figures.prune_figures(settings.MAILADMIN_FIGURES_DAYS)
    sessions = _delete_in_batches(ended, "started_at", batch_size, figures.roll_up_sessions)
    failures = _delete_in_batches(failed, "created_at", batch_size, figures.roll_up_failures)
    return Pruned(sessions=sessions, failures=failures, figures=old_figures)


def _delete_in_batches(
    rows: QuerySet, time_field: str, batch_size: int | None, roll_up: Callable[[list[tuple]], None]
) -> int:
    """Delete ``rows`` oldest first, each batch going on from the time where the last stopped.

    Rows a batch passes over stay (an old session still open) and would otherwise be read
    again by every later batch, as would, on PostgreSQL, the index entries of the rows already
    deleted, until a vacuum or a later scan marks them dead: at the end of a large prune,
    batches of hundreds of milliseconds. ``>=``, not ``>``: a batch may end inside a run of
    rows of the same time. Once nothing is left ahead, one last look from the oldest row finds
    what came due behind (a lost session swept closed, whose end is its start).
    """
    removed, size, since = 0, batch_size or FIRST_BATCH_SIZE, None
    while True:
        started = time.monotonic()
        todo = rows if since is None else rows.filter(**{f"{time_field}__gte": since})
        # A batch a crash forgets (on SQLite, whose commits here do not wait for the disk) is
        # forgotten whole, figures and deletions together, and the next run prunes its rows again.
        with collection_paused(), leaving_no_flush_to_others():
            batch = list(todo.order_by(time_field).values_list("pk", "domain_id", time_field)[:size])
            if batch:
                roll_up([(pk, domain_id) for pk, domain_id, _ in batch])
                _, per_model = rows.model.objects.filter(pk__in=[pk for pk, _, _ in batch]).delete()
        if not batch:
            if since is None:
                return removed
            since = None
            continue
        removed += per_model.get(rows.model._meta.label, 0)
        since = batch[-1][2]
        took = time.monotonic() - started
        letting_the_log_catch_up()
        if batch_size is None:
            size = next_batch_size(size, took)
        time.sleep(min(MAX_PAUSE_SECONDS, took))


def next_batch_size(size: int, took: float) -> int:
    """The size that would have taken BATCH_SECONDS at the last batch's pace, growing at most
    twofold per batch (a quick batch may have been luck) and within the bounds."""
    wanted = size * BATCH_SECONDS / took if took > 0 else 2 * size
    return max(MIN_BATCH_SIZE, min(MAX_BATCH_SIZE, 2 * size, int(wanted)))
