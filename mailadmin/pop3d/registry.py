"""POP3 sessions as database rows, written by the runpop3 process that serves them.

The database is the truth every process shares: the web admin reads these rows, and a kick
is a mark on a row. Each runpop3 process runs one :class:`Pop3Monitor`, which once per
POP3_MONITOR_INTERVAL, in one unit on the database executor:

* writes what its sessions' :class:`SessionRecorder` observers queued (new rows, progress,
  endings), so a busy session costs at most one UPDATE per interval;
* heartbeats its :class:`~mailadmin.models.Pop3Node` row (the first tick registers it) and
  renews the maildrop leases its :class:`~mailadmin.pop3d.leases.LeaseKeeper` holds;
* finds its sessions to end: kicked (``kick_requested_at`` set by the admin, the API or
  ``kickpop3``), mailbox no longer usable (``Mailbox.objects.usable()``), password changed,
  mailbox deleted; and ends them with no UPDATE applied;
* now and then marks sessions of processes that stopped heartbeating as ``lost``;
* with a channel layer that crosses processes, rings the live sessions page's doorbell about
  the rows it wrote (``mailadmin.pop3d.feed``).

The loop never ends on an error: a failed tick is logged, its row writes are kept for the next
tick (dropped instead when the error is not a transient one, so one bad row cannot block the
heartbeat for good), and the next tick comes after a back-off that doubles up to a quarter of
the lease TTL. The one way out is the leases: once a held lease has gone unrenewed for longer
than its TTL, this process may have lost the lock, so the monitor gives up (``gave_up``) and
runpop3 stops serving and exits non-zero.
"""

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import IntegrityError
from django.db.models import Exists, F, OuterRef, Subquery
from django.db.models.functions import Now
from django.utils import timezone

from mailadmin.addresses import domain_of_login
from mailadmin.executors import TRANSIENT_DB_ERRORS, BoundedExecutor
from mailadmin.hosting import store
from mailadmin.hosting.commits import forgotten_only_with_this_host, not_waiting_for_the_disk
from mailadmin.models import Domain, Mailbox, Pop3Node, Pop3Session
from mailadmin.pop3d import feed
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.maildrop import OrmMaildrop
from pop3.mailbox import ConnectionInfo, EndReason, LoginFailure, Maildrop, SessionStats
from pop3.session import Session, log_text

logger = logging.getLogger("mailadmin.pop3")

# A process whose heartbeat is older than this many monitor intervals is taken for dead.
STALE_INTERVALS = 10
MIN_STALE_SECONDS = 10.0
SWEEP_EVERY_TICKS = 30
ID_BATCH_SIZE = 500
MAX_NAME_LENGTH = 320  # an address: 64 + 1 + 255
# Ticks that succeed are at least this share of the interval apart, however long they take.
MIN_GAP_SHARE_OF_INTERVAL = 0.25
# Back-off after failed ticks: the interval doubles per failure in a row, up to this share of
# the lease TTL, so a lease still gets several renewal attempts before it could lapse.
MAX_BACKOFF_SHARE_OF_TTL = 0.25
MAX_BACKOFF_DOUBLINGS = 16

STAT_FIELDS = (
    "commands",
    "bytes_in",
    "bytes_out",
    "retr_count",
    "retr_bytes",
    "top_count",
    "top_bytes",
    "deleted_count",
    "deleted_bytes",
    "marked_count",
    "marked_bytes",
    "message_count",
    "message_bytes",
)


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def password_fingerprint(password_hash: str) -> str:
    """Enough of a password hash to notice it changed, without copying the hash around."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


def printable(text: str) -> str:
    """Client-supplied text made safe for rows and listings: non-printables become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def stale_after(interval: float) -> timedelta:
    return timedelta(seconds=max(MIN_STALE_SECONDS, STALE_INTERVALS * interval))


def domain_named(name: str | None) -> Subquery | None:
    """The id of our domain called ``name`` (None if it is not ours), as a subquery of the write itself."""
    if name is None:
        return None
    return Subquery(Domain.objects.filter(name=name).order_by().values("pk"))


def backoff_delay(failures: int, interval: float, lease_ttl: float, now: float) -> float:
    """Seconds until the next tick after ``failures`` failed ticks in a row, ``now`` being the
    wall-clock time (``time.time()``).

    Ticks that succeed start at each multiple of ``interval`` on the wall clock, however long
    each takes (``feed.seconds_to_beat``: a tick's writes are what the live page waits for), but
    never less than a quarter of the interval apart, so a slow database is not asked back at once:
    a tick that ends just before a beat is followed a quarter interval later, just after it.
    """
    if not failures:
        return max(feed.seconds_to_beat(interval, now), interval * MIN_GAP_SHARE_OF_INTERVAL)
    ceiling = max(interval, lease_ttl * MAX_BACKOFF_SHARE_OF_TTL)
    return min(interval * 2 ** min(failures, MAX_BACKOFF_DOUBLINGS), ceiling)


@dataclass
class Outbox:
    """Row writes queued by recorders since the last tick."""

    inserts: list[dict] = field(default_factory=list)
    updates: dict[str, dict] = field(default_factory=dict)
    # Sessions that ran commands since the last tick; their counters are read at the tick.
    progress: dict[str, SessionStats] = field(default_factory=dict)

    def update(self, session_id: str, **fields) -> None:
        self.updates.setdefault(session_id, {}).update(fields)


class SessionRecorder:
    """The SessionObserver of one session: queues its row writes and logs its end."""

    def __init__(self, monitor: "Pop3Monitor", session: Session) -> None:
        self.monitor = monitor
        self.session = session
        self.session_id = ""
        self.username = ""
        self.log_name = ""  # the name as the log line shows it (pop3.session.log_text)
        self.info: ConnectionInfo | None = None
        self.tls = ""
        self.maildrop: OrmMaildrop | None = None

    def opened(self, info: ConnectionInfo) -> None:
        self.info = info
        self.session_id = info.session_id
        self.monitor.outbox.inserts.append(
            {
                "id": info.session_id,
                "node": self.monitor.node,
                "peer_host": info.peer[0],
                "peer_port": info.peer[1],
                "local_host": info.local[0],
                "local_port": info.local[1],
                "implicit_tls": info.implicit_tls,
                "started_at": timezone.now(),
            }
        )

    def tls_established(self, version: str, cipher: str) -> None:
        self.tls = version
        self.monitor.outbox.update(self.session_id, tls_version=version, tls_cipher=cipher)

    def login_failed(self, username: str, failure: LoginFailure, mechanism: str) -> None:
        """The authenticator records the failure itself; the session row learns the name tried."""
        self._name(username)
        self.monitor.outbox.update(
            self.session_id, username=self.username, tried_domain=domain_of_login(username)
        )

    def logged_in(self, username: str, mechanism: str, maildrop: Maildrop) -> None:
        self._name(username)
        fields = {"username": self.username, "authenticated_at": timezone.now()}
        if isinstance(maildrop, OrmMaildrop):
            self.maildrop = maildrop
            fields["mailbox_id"] = maildrop.mailbox_id
        self.monitor.outbox.update(self.session_id, **fields)
        self.monitor.track(self)

    def _name(self, username: str) -> None:
        self.username = printable(username)[:MAX_NAME_LENGTH]
        self.log_name = log_text(username[:MAX_NAME_LENGTH])

    def progress(self, stats: SessionStats) -> None:
        self.monitor.outbox.progress[self.session_id] = stats

    def closed(self, reason: EndReason, stats: SessionStats) -> None:
        self.monitor.untrack(self)
        self.monitor.outbox.update(
            self.session_id, ended_at=timezone.now(), end_reason=reason.value, **_stat_fields(stats)
        )
        logger.info(
            "session=<%s> user=<%s> rip=%s lip=%s%s: %s "
            "top=%d/%d, retr=%d/%d, del=%d/%d, size=%d, in=%d, out=%d",
            self.session_id,
            self.log_name,
            self.info.peer[0],
            self.info.local[0],
            f" {self.tls}" if self.tls else "",
            reason.value,
            stats.top_count,
            stats.top_bytes,
            stats.retr_count,
            stats.retr_bytes,
            stats.deleted_count,
            stats.deleted_bytes,
            stats.message_bytes,
            stats.bytes_in,
            stats.bytes_out,
        )


def _stat_fields(stats: SessionStats) -> dict[str, int]:
    return {name: getattr(stats, name) for name in STAT_FIELDS}


class Pop3Monitor:
    """One per runpop3 process; see the module docstring."""

    def __init__(
        self,
        executor: BoundedExecutor,
        leases: LeaseKeeper,
        *,
        node: str,
        interval: float,
        on_give_up: Callable[[], None],
        publisher: feed.SessionPublisher | None = None,
    ) -> None:
        self.executor = executor
        self.leases = leases
        self.node = node
        self.interval = interval
        self.outbox = Outbox()
        # Called, and gave_up set, when a held lease has gone unrenewed for its whole TTL.
        self.on_give_up = on_give_up
        self.gave_up = False
        self.publisher = publisher
        self._tracked: dict[str, SessionRecorder] = {}
        self._ticks = 0
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def recorder(self, session: Session) -> SessionRecorder:
        return SessionRecorder(self, session)

    def track(self, recorder: SessionRecorder) -> None:
        self._tracked[recorder.session_id] = recorder

    def untrack(self, recorder: SessionRecorder) -> None:
        self._tracked.pop(recorder.session_id, None)

    def start(self) -> None:
        self._stopping = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        tick: asyncio.Future | None = None
        while True:
            # A tick that hangs (a database that neither answers nor fails) is waited for only
            # until a held lease would lapse.
            if tick is None:
                tick = asyncio.ensure_future(self.tick())
            done, _ = await asyncio.wait({tick}, timeout=self.leases.seconds_left())
            if done:
                failures = 0 if tick.result() else failures + 1
                tick = None
            if self.leases.lapsed():
                logger.error(
                    "POP3 monitor: maildrop leases went unrenewed for over %g s; "
                    "this process may no longer hold its locks",
                    self.leases.ttl_seconds,
                )
                self.gave_up = True
                self.on_give_up()
                return
            if tick is not None:
                continue  # the lease that would have lapsed was given back meanwhile
            delay = backoff_delay(failures, self.interval, self.leases.ttl_seconds, time.time())
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass

    async def tick(self) -> bool:
        """One round of the monitor's database work; False when it failed (and was logged)."""
        outbox, self.outbox = self.outbox, Outbox()
        for session_id, stats in outbox.progress.items():
            outbox.updates[session_id] = {**_stat_fields(stats), **outbox.updates.get(session_id, {})}
        tracked = {
            session_id: recorder.maildrop
            for session_id, recorder in self._tracked.items()
            if recorder.maildrop is not None
        }
        self._ticks += 1
        sweep = self._ticks % SWEEP_EVERY_TICKS == 1
        owners = self.leases.owners()
        try:
            kicks, notice = await self.executor.run(
                sync_node,
                self.node,
                outbox,
                tracked,
                self.leases,
                owners,
                self.interval,
                sweep,
                self.publisher is not None,
            )
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("POP3 monitor: the database is unavailable (%s); retrying", error)
            self._requeue(outbox)
            return False
        except Exception:
            logger.exception("POP3 monitor tick failed; its session row writes are dropped")
            return False
        if notice is not None:
            self.publisher.send(notice)
        for session_id in kicks:
            recorder = self._tracked.get(session_id)
            if recorder is not None:
                recorder.session.kick(EndReason.KICKED)
        return True

    async def stop(self) -> None:
        """Finish the tick in flight, write what is still queued, sign off.

        Call after the sessions have ended. A monitor that gave up writes nothing more: the
        database did not answer, and waiting for it again would keep the process from exiting;
        the other processes' sweep ends this one's session rows as lost.
        """
        self._stopping.set()
        await self._task
        if self.gave_up:
            return
        await self.tick()
        if self.publisher is not None:
            await self.publisher.settle()
        try:
            await self.executor.run(unregister_node, self.node)
        except TRANSIENT_DB_ERRORS as error:
            logger.warning("POP3 monitor: could not sign %s off (%s)", self.node, error)

    def _requeue(self, outbox: Outbox) -> None:
        newer = self.outbox
        self.outbox = outbox
        self.outbox.inserts += newer.inserts
        for session_id, fields in newer.updates.items():
            self.outbox.update(session_id, **fields)
        self.outbox.progress.update(newer.progress)


# --- Sync units -------------------------------------------------------------------------------


def unregister_node(node: str) -> None:
    Pop3Node.objects.filter(name=node).delete()


def sync_node(
    node: str,
    outbox: Outbox,
    tracked: dict[str, OrmMaildrop],
    leases: LeaseKeeper,
    owners: list[str],
    interval: float,
    sweep: bool,
    notify: bool = False,
) -> tuple[list[str], dict | None]:
    """One monitor tick's database work; returns the ids of sessions to end, and (if ``notify``)
    the notice about the session rows written, or None when none were.

    The heartbeat and lease renewal come first and never depend on the row writes: a row that
    cannot be written must not stop this process from holding its locks. The heartbeat commits
    without waiting for the disk: the next tick writes again one that a crash forgot.
    """
    now = timezone.now()
    with not_waiting_for_the_disk():
        Pop3Node.objects.update_or_create(
            name=node,
            defaults={"heartbeat_at": now},
            create_defaults={"started_at": now, "heartbeat_at": now},
        )
    leases.renew(owners)
    write_session_rows(outbox)
    swept = sweep_lost_sessions(interval) if sweep else 0
    notice = None
    if notify:
        written = [fields["id"] for fields in outbox.inserts] + list(outbox.updates)
        notice = feed.notice_about(written, anything=swept > 0)
    return sessions_to_end(tracked), notice


def write_session_rows(outbox: Outbox) -> None:
    """Apply the queued inserts and updates; on a conflict, row by row, dropping bad ones.

    On SQLite the commits do not wait for the disk (``forgotten_only_with_this_host``), so a
    tick does not hold the write turn through an fsync; on PostgreSQL they wait: a row forgotten
    while runpop3 goes on would never be written again, and a session whose row is missing
    cannot be kicked, nor ended when its password changes (``sessions_to_end`` reads the rows)."""
    try:
        with forgotten_only_with_this_host():
            _apply(outbox.inserts, outbox.updates.items())
    except IntegrityError:
        for fields in outbox.inserts:
            _apply_alone([fields], [])
        for item in outbox.updates.items():
            _apply_alone([], [item])


def _apply(inserts: list[dict], updates) -> None:
    """The rows in plain SQL built once (``store.fastsql``): through the ORM, compiling each
    tick's UPDATEs cost runpop3 over a millisecond of CPU per session."""
    if inserts:
        store.insert_session_rows(inserts)
    for session_id, fields in updates:
        store.update_session_row(session_id, fields)
        if "mailbox_id" in fields:
            store.record_last_login(fields["mailbox_id"], session_id, fields["authenticated_at"])


def _apply_alone(inserts: list[dict], updates) -> None:
    try:
        with forgotten_only_with_this_host():
            _apply(inserts, updates)
    except IntegrityError:
        logger.exception("dropped a POP3 session row write that the database refused")


def sessions_to_end(tracked: dict[str, OrmMaildrop]) -> list[str]:
    ids = list(tracked)
    doomed = []
    for start in range(0, len(ids), ID_BATCH_SIZE):
        rows = (
            Pop3Session.objects.filter(pk__in=ids[start : start + ID_BATCH_SIZE])
            .annotate(usable=Exists(Mailbox.objects.usable().filter(pk=OuterRef("mailbox_id"))))
            .values_list("pk", "kick_requested_at", "usable", "mailbox__user__password")
        )
        for session_id, kick_requested_at, usable, password in rows:
            key = session_id.hex
            if (
                kick_requested_at is not None
                or not usable
                or password_fingerprint(password) != tracked[key].password_fingerprint
            ):
                doomed.append(key)
    return doomed


def sweep_lost_sessions(interval: float) -> int:
    """End the open sessions of processes that stopped heartbeating, and forget those processes."""
    dead = Pop3Node.objects.filter(heartbeat_at__lt=timezone.now() - stale_after(interval))
    lost = Pop3Session.objects.open().filter(node__in=dead.values("name"))
    count = lost.update(ended_at=timezone.now(), end_reason=Pop3Session.EndReason.LOST, updated_at=Now())
    orphans = Pop3Session.objects.open().exclude(node__in=Pop3Node.objects.values("name"))
    count += orphans.update(ended_at=F("started_at"), end_reason=Pop3Session.EndReason.LOST, updated_at=Now())
    dead.delete()
    return count
