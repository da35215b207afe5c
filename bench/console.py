"""Console scenarios: the admin's pages at scale, and ``prunehistory`` beside a writer.

``python -m bench.console seed SPEC.json`` fills the bench database with bulk SQL (one
``INSERT ... SELECT`` over a generated series per table, seconds for a million rows):
``mailboxes`` mailboxes over ``domains`` domains, ``sessions`` POP3 session rows over the last
``days`` days (the newest ``open_sessions`` still open) and ``failures`` failed logins.

``python -m bench.console pages SPEC.json OUT.json`` times the pages in-process with Django's
test client: the server's time for each request, from the URL to the finished response, with
no network in it. ``python -m bench.console writer OUT.json STOP`` writes as runpop3's
monitor does, with its code: every ``WRITE_EVERY_SECONDS`` one tick's session rows, timed,
until the file STOP appears; the prune scenario runs it alone for a while (the control), then
beside ``python -m bench.console prune OUT.json``: ``prunehistory`` with when its batches and
its checkpointer held the write turn, to tell what the longest writes waited for.
"""

import json
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

CONSOLE_DOMAIN = "console.test"
QUOTA_BYTES = 100 * 1024 * 1024
SESSION_SECONDS = 30
WRITE_EVERY_SECONDS = 0.02
ROWS_PER_WRITE = 5
# Left out of the figures: the first writes pay for the connection, imports and new files.
WARM_UP_WRITES = 10
LONGEST_WRITES_SHOWN = 5
# A prune batch's statements, timed apart: its start (on SQLite, BEGIN IMMEDIATE, which can wait
# for SQLite's own locks after the write turn is taken), the next rows, the roll-up into the
# figures, the delete.
BATCH_VERBS = ("BEGIN", "SELECT", "INSERT", "DELETE")


@dataclass(frozen=True)
class ConsoleSpec:
    mailboxes: int = 100_000
    domains: int = 100
    sessions: int = 1_000_000
    open_sessions: int = 1_000
    failures: int = 100_000
    days: int = 30
    requests: int = 10

    @classmethod
    def smoke(cls) -> "ConsoleSpec":
        return cls(mailboxes=500, domains=5, sessions=5_000, open_sessions=20, failures=500, requests=2)


def domain_name(index: int) -> str:
    return f"d{index}.{CONSOLE_DOMAIN}"


# --- Seeding ---------------------------------------------------------------------------------


class Sql:
    """The few expressions where SQLite and PostgreSQL differ."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor

    def series(self, count: int) -> str:
        if self.vendor == "postgresql":
            return f"WITH series AS (SELECT generate_series(0, {count - 1}) AS i)"
        return (
            f"WITH RECURSIVE series(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM series WHERE i < {count - 1})"
        )

    def seconds_ago(self, seconds: str) -> str:
        if self.vendor == "postgresql":
            return f"(now() - ({seconds}) * interval '1 second')"
        return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ({seconds}) || ' seconds')"

    def plus_seconds(self, moment: str, seconds: int) -> str:
        if self.vendor == "postgresql":
            return f"({moment} + interval '{seconds} seconds')"
        return f"strftime('%Y-%m-%d %H:%M:%f', {moment}, '+{seconds} seconds')"

    def new_uuid(self) -> str:
        return "gen_random_uuid()" if self.vendor == "postgresql" else "lower(hex(randomblob(16)))"

    def text(self, expression: str) -> str:
        return f"CAST({expression} AS TEXT)"


def seed(spec: ConsoleSpec) -> dict:
    from django.db import connection, transaction

    from mailadmin.models import Domain

    sql = Sql(connection.vendor)
    started = time.perf_counter()
    with transaction.atomic():
        Domain.objects.bulk_create(
            [Domain(name=domain_name(d), quota_bytes=QUOTA_BYTES * 2000) for d in range(spec.domains)]
        )
        first_domain = Domain.objects.get(name=domain_name(0)).pk
        with connection.cursor() as cursor:
            for statement in _seed_statements(spec, sql, first_domain):
                cursor.execute(statement)
                # Statistics of the rows just added: without them PostgreSQL plans the next
                # statement's join for a table of one row (and runs for hours).
                cursor.execute("ANALYZE")
            # Near their cap: a few domains, for the dashboard's figure.
            cursor.execute(
                "UPDATE mailadmin_domain SET used_bytes = quota_bytes * 9 / 10 "
                f"WHERE name LIKE '%%.{CONSOLE_DOMAIN}' AND id % 10 = 0"
            )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return {"seed_seconds": round(time.perf_counter() - started, 1)}


def _seed_statements(spec: ConsoleSpec, sql: Sql, first_domain: int) -> list[str]:
    """Users, mailboxes, sessions, failed logins; mailbox k is in domain k % domains."""
    d = spec.domains
    address, session_address = _address(sql, "i", d), _address(sql, f"(i % {spec.mailboxes})", d)
    window = spec.days * 86400
    started = sql.seconds_ago(f"i * {window}.0 / {spec.sessions}")
    ended = sql.plus_seconds(started, SESSION_SECONDS)
    first_user = f"(SELECT min(id) FROM auth_user WHERE username LIKE '%%.{CONSOLE_DOMAIN}')"
    mailbox = f"(SELECT min(id) FROM mailadmin_mailbox) + i % {spec.mailboxes}"
    return [
        f"{sql.series(spec.mailboxes)} INSERT INTO auth_user (password, is_superuser, username, first_name, "
        "last_name, email, is_staff, is_active, date_joined) "
        f"SELECT '!', FALSE, {address}, '', '', '', FALSE, TRUE, {sql.seconds_ago('0')} FROM series",
        # One INSERT in user id order: mailbox ids follow the users' order, k for user k.
        "INSERT INTO mailadmin_mailbox (user_id, domain_id, active, quota_bytes, quota_messages, used_bytes, "
        "used_messages, quota_warning_percent, next_uid, uid_validity, created_at, last_login_from) "
        f"SELECT u.id, {first_domain} + (u.id - {first_user}) % {d}, TRUE, {QUOTA_BYTES}, 0, "
        f"{QUOTA_BYTES} / 100 * ((u.id - {first_user}) * 37 % 101), 0, 0, 1, 1, u.date_joined, '' "
        f"FROM auth_user u WHERE u.username LIKE '%%.{CONSOLE_DOMAIN}' ORDER BY u.id",
        f"{sql.series(spec.sessions)} INSERT INTO mailadmin_pop3session (id, node, username, mailbox_id, "
        "domain_id, peer_host, peer_port, local_host, local_port, implicit_tls, tls_version, tls_cipher, "
        "started_at, authenticated_at, ended_at, end_reason, commands, bytes_in, bytes_out, retr_count, "
        "retr_bytes, top_count, top_bytes, deleted_count, deleted_bytes, marked_count, marked_bytes, "
        "message_count, message_bytes, "
        f"updated_at) SELECT {sql.new_uuid()}, 'bench:1', {session_address}, {mailbox}, "
        f"{first_domain} + i % {spec.mailboxes} % {d}, '192.0.2.' || {sql.text('i % 250')}, 40000, "
        f"'127.0.0.1', 110, FALSE, 'TLSv1.3', '', {started}, "
        f"CASE WHEN i % 10 = 0 THEN NULL ELSE {started} END, "
        f"CASE WHEN i < {spec.open_sessions} THEN NULL ELSE {ended} END, "
        f"CASE WHEN i < {spec.open_sessions} THEN '' ELSE 'quit' END, "
        "6, 60, 4000, i % 5, i % 5 * 20000, 0, 0, i % 5, i % 5 * 20000, 0, 0, 5, 100000, "
        f"{started} FROM series",
        f"{sql.series(spec.failures)} INSERT INTO mailadmin_authfailure (created_at, username, domain_id, "
        "peer_host, source, mechanism, reason, attempt, penalised) "
        f"SELECT {sql.seconds_ago(f'i * {window}.0 / {spec.failures}')}, {address}, "
        f"{first_domain} + i % {d}, '198.51.100.' || {sql.text('i % 250')}, "
        f"'198.51.100.' || {sql.text('i % 250')}, 'USER', 'bad credentials', '', TRUE FROM series",
    ]


def _address(sql: Sql, index: str, domains: int) -> str:
    """Mailbox ``index``'s address, as SQL: m<k>@d<k % domains>.console.test."""
    return f"'m' || {sql.text(index)} || '@d' || {sql.text(f'{index} % {domains}')} || '.{CONSOLE_DOMAIN}'"


# --- Pages -----------------------------------------------------------------------------------


def time_pages(spec: ConsoleSpec) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import NoReverseMatch, reverse

    from mailadmin.hosting import services
    from mailadmin.hosting.actors import Actor

    settings.ALLOWED_HOSTS = ["*"]
    root = get_user_model().objects.create_superuser("dashboard-root", "", None)
    services.save_domain_administrator(Actor.cli(), "dashboard-admin", [domain_name(0)], uuid.uuid4().hex)
    admin = get_user_model().objects.get(username="dashboard-admin")
    pages = {"dashboard": "/admin/", "mailbox_list": "/admin/mailadmin/mailbox/", "charts": "/admin/charts/"}
    for name, url_name, query in (("quota", "admin:quota", "?over=80"), ("history", "admin:history", "")):
        try:
            pages[name] = reverse(url_name) + query
        except NoReverseMatch:
            pass
    results = {}
    for who, user in (("superuser", root), ("domain_admin", admin)):
        client = Client()
        client.force_login(user)
        for page, url in pages.items():
            results[f"{page}_{who}"] = _timed_requests(client, url, spec.requests)
    return results


def _timed_requests(client, url: str, count: int) -> dict:
    samples = []
    for attempt in range(count + 1):  # the first pays for imports, templates and connections
        started = time.perf_counter()
        response = client.get(url, secure=True)
        if attempt:
            samples.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}")
    return {
        "url": url,
        "requests": count,
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
    }


# --- A writer beside the prune ---------------------------------------------------------------


def write_until(stop: Path) -> dict:
    """runpop3's monitor, through its own code: each write is one tick's session rows
    (``registry.write_session_rows``), new rows and updates to them, on and on.

    Returns every write as ``[wall-clock start, seconds]``, so that the caller can tell the
    writes beside the prune from those made without it."""
    from django.utils import timezone

    from mailadmin.pop3d import registry

    samples = []
    turn_waits = _timing_turn_waits()
    while not stop.exists():
        ids = [uuid.uuid4().hex for _ in range(ROWS_PER_WRITE)]
        inserts = [
            {
                "id": session_id,
                "node": "bench-writer:1",
                "peer_host": "192.0.2.1",
                "peer_port": 1,
                "local_host": "127.0.0.1",
                "local_port": 110,
                "started_at": timezone.now(),
            }
            for session_id in ids
        ]
        # Each tick updates the rows of the sessions that ran commands since the last one.
        outbox = registry.Outbox(inserts=inserts, updates={session_id: {"commands": 1} for session_id in ids})
        wall, started = time.time(), time.perf_counter()
        turn_waits.clear()
        registry.write_session_rows(outbox)
        samples.append([wall, time.perf_counter() - started, sum(turn_waits)])
        time.sleep(WRITE_EVERY_SECONDS)
    return {"samples": samples[WARM_UP_WRITES:]}


def _timing_turn_waits() -> list[float]:
    """On SQLite, the seconds each write then waits for the write turn (``mailadmin.sqlite``),
    appended to the list returned; on PostgreSQL, which has no turn, nothing."""
    from django.db import connection

    return _timing("_lock_writers") if connection.vendor == "sqlite" else []


def _timing(method: str) -> list[float]:
    """The seconds each later call of ``method`` of this thread's connection takes, appended to
    the list returned."""
    from django.db import connection

    seconds: list[float] = []
    untimed = getattr(connection, method)

    def timed():
        started = time.perf_counter()
        try:
            untimed()
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(connection, method, timed)
    return seconds


def prune_traced() -> dict:
    """``prunehistory --days 0``, in this process, with when each of its batches held its
    transaction (on SQLite, the write turn, from when it got it) and, on SQLite, when its
    checkpointer thread (``checkpointer``) or its own checkpoints after each batch (``prune
    checkpoint``) held the turn: ``{"output": ..., "holds": [[kind, wall-clock start, seconds,
    of which committing, then in its statements by BATCH_VERBS], ...]}`` (the checkpoints',
    without the last four)."""
    import contextlib
    import io
    import threading

    from django.core.management import call_command
    from django.db import connection

    from mailadmin.hosting import history

    holds: list[list] = []
    batch = history.leaving_no_flush_to_others
    commits, turns_taken = _timing("_commit"), _noting_turns_taken()
    statements: dict[str, float] = {}

    def timed_statement(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            verb = sql.split(None, 1)[0].upper()
            statements[verb] = statements.get(verb, 0.0) + time.perf_counter() - started

    @contextlib.contextmanager
    def timed_batch():
        commits.clear()
        turns_taken.clear()
        statements.clear()
        wall, started = time.time(), time.perf_counter()
        with batch():
            yield
        # On SQLite the hold begins once the turn is taken, not while the batch waits for it.
        wall, started = turns_taken[0] if turns_taken else (wall, started)
        held = time.perf_counter() - started
        in_statements = [statements.get(verb, 0.0) for verb in BATCH_VERBS]
        holds.append(["batch", wall, held, sum(commits), *in_statements])

    history.leaving_no_flush_to_others = timed_batch
    _trace_checkpointer_turns(holds, threading)
    output = io.StringIO()
    with connection.execute_wrapper(timed_statement):
        call_command("prunehistory", "--days", "0", stdout=output)
    return {"output": output.getvalue().strip(), "holds": holds}


def _noting_turns_taken() -> list[tuple[float, float]]:
    """On SQLite, when (wall clock, perf counter) each later write transaction of this thread's
    connection got the write turn, appended to the list; on PostgreSQL, nothing."""
    from django.db import connection

    taken: list[tuple[float, float]] = []
    if connection.vendor != "sqlite":
        return taken
    lock_writers = connection._lock_writers

    def noted():
        lock_writers()
        taken.append((time.time(), time.perf_counter()))

    connection._lock_writers = noted
    return taken


def _trace_checkpointer_turns(holds: list[list], threading) -> None:
    from django.db import connection

    if connection.vendor != "sqlite":
        return
    from mailadmin.sqlite import base

    taken: dict[int, tuple[float, float]] = {}
    checkpointing: set[int] = set()  # threads in a checkpoint (the checkpointer's, and the prune's own)
    take_write_turn, checkpoint = base.take_write_turn, base.checkpoint

    def timed_take(writer_lock, timeout):
        got = take_write_turn(writer_lock, timeout)
        if got and threading.get_ident() in checkpointing:
            taken[threading.get_ident()] = (time.time(), time.perf_counter())
        return got

    def timed_checkpoint(connection, writer_lock):
        checkpointing.add(threading.get_ident())
        try:
            checkpoint(connection, writer_lock)
        finally:
            checkpointing.discard(threading.get_ident())
            turn = taken.pop(threading.get_ident(), None)
            if turn is not None:
                prunes_own = threading.current_thread() is threading.main_thread()
                kind = "prune checkpoint" if prunes_own else "checkpointer"
                holds.append([kind, turn[0], time.perf_counter() - turn[1]])

    base.take_write_turn, base.checkpoint = timed_take, timed_checkpoint


def write_figures(
    samples: list[list[float]], prune_started: float, prune_ended: float, holds: list[list] | None = None
) -> dict:
    """The writes that overlapped the prune, and as a control those made with no prune beside
    them (before it started), each as count, median, p99 and longest; and what the longest
    writes beside the prune waited for (``longest_writes``)."""
    beside = [sample for sample in samples if sample[0] < prune_ended and sum(sample[:2]) > prune_started]
    alone = [sample[1] for sample in samples if sum(sample[:2]) <= prune_started]
    figures = {**_write_figures([sample[1] for sample in beside], ""), **_write_figures(alone, "control_")}
    figures["longest_writes"] = _longest_writes(beside, holds or [], prune_started)
    if holds:
        for kind in ("batch", "checkpointer", "prune checkpoint"):
            longest = max((hold[2] for hold in holds if hold[0] == kind), default=None)
            name = f"longest_{kind.replace(' ', '_')}_hold_ms"
            figures[name] = None if longest is None else round(longest * 1000, 1)
    return figures


def _longest_writes(beside: list[list[float]], holds: list[list], prune_started: float) -> list[dict]:
    """The LONGEST_WRITES_SHOWN longest writes: when (seconds into the prune), how long, how much
    of it waiting for the write turn, and the prune's holds of the turn that overlapped it (in
    ms; a batch's with the parts of it spent committing, then in BATCH_VERBS statements)."""
    shown = []
    for start, took, *wait in sorted(beside, key=lambda sample: -sample[1])[:LONGEST_WRITES_SHOWN]:
        overlapping = [
            [kind, *(round(seconds * 1000, 1) for seconds in durations)]
            for kind, held, *durations in holds
            if held < start + took and held + durations[0] > start
        ]
        shown.append(
            {
                "at_s": round(start - prune_started, 2),
                "ms": round(took * 1000, 1),
                "turn_wait_ms": round(wait[0] * 1000, 1) if wait else None,
                "prune_holds_ms": overlapping,
            }
        )
    return shown


def _write_figures(latencies: list[float], prefix: str) -> dict:
    ordered = sorted(latencies)

    def ms(rank: int) -> float | None:
        return round(ordered[rank] * 1000, 1) if ordered else None

    return {
        f"{prefix}writes": len(ordered),
        f"{prefix}write_p50_ms": ms(len(ordered) // 2),
        f"{prefix}write_p99_ms": ms(int(len(ordered) * 0.99)),
        f"{prefix}longest_write_stall_ms": ms(-1),
    }


def main(argv: list[str]) -> None:
    import django

    django.setup()
    command = argv[0]
    if command == "seed":
        Path(argv[2]).write_text(json.dumps(seed(ConsoleSpec(**json.loads(Path(argv[1]).read_text())))))
    elif command == "pages":
        Path(argv[2]).write_text(json.dumps(time_pages(ConsoleSpec(**json.loads(Path(argv[1]).read_text())))))
    elif command == "writer":
        Path(argv[1]).write_text(json.dumps(write_until(Path(argv[2]))))
    elif command == "prune":
        Path(argv[1]).write_text(json.dumps(prune_traced()))
    else:
        raise SystemExit(f"unknown command {command!r}")


def write_spec(spec: ConsoleSpec, path: Path) -> None:
    path.write_text(json.dumps(asdict(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
