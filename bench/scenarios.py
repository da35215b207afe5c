"""The scenarios: each group runs on one freshly started server with the settings it needs.

A group returns ``{scenario: figures}``. Figures are plain numbers (seconds, counts, rates,
KiB) plus a few lists of samples; ``report`` turns them into the table and the JSON.
"""

import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import api, console, console_pages, corpus, live
from bench.clients import Pop3, ProtocolError, tls_context
from bench.dovecot import ARGON2_HASHES, PLAIN_PASSWORDS, Dovecot, make_root, missing, remove_root
from bench.load import Tally, Task, Workers, fleet_worker, lmtp_worker, login_worker, retr_worker
from bench.maildirs import CORPUS, FLEET
from bench.servers import PROJECT_DIR, Environment, Server, start_lmtp, start_pop3, start_web

MB = 1_000_000  # rates are in decimal megabytes, as Dovecot's figures are
# Time for the (already running) workers to receive their tasks before the window opens.
START_DELAY_SECONDS = 0.5
# Time for the monitor (POP3_MONITOR_INTERVAL=1) to write its rows before memory is read.
SETTLE_SECONDS = 1.5
OPENING_THREADS = 4
CACHE_ON_TTL = "300"
# The throughput scenarios run the servers as shipped (POP3_WORKERS and LMTP_WORKERS unset:
# one worker per usable CPU); the cold and memory ones one process, so that its /proc figures
# are the whole server and the hashing threads are the two the README describes.
AS_SHIPPED = None
ONE_PROCESS = 1
# The writer beside prunehistory runs alone this long before it (its control window) and
# a little after it.
WRITER_CONTROL_SECONDS = 30.0
SMOKE_CONTROL_SECONDS = 1.0
WRITER_TAIL_SECONDS = 2.0


@dataclass(frozen=True)
class Options:
    seconds: float
    clients: int
    idle_sessions: int
    held_sessions: int
    pipelined: int
    repeats: int
    pipe_deliveries: int = 20  # through runlmtp; a quarter as many in-process (a second each)
    live_sessions: int = 1000
    live_probes: int = 40
    only: frozenset[str] = frozenset()
    smoke: bool = False
    import_rows: int = 10_000
    token_checks: int = 2000


@dataclass
class Bench:
    """What every scenario needs: the environment, the corpus, the options, the certificate."""

    env: Environment
    spec: corpus.CorpusSpec
    options: Options
    certificate: tuple[Path, Path]
    workers: Workers
    servers: dict[str, dict] = field(default_factory=dict)

    def wants(self, scenario: str) -> bool:
        return not self.options.only or scenario in self.options.only

    @property
    def connection_limit(self) -> str:
        return str(self.options.held_sessions + 2 * self.options.idle_sessions + 100)

    @contextmanager
    def pop3(
        self, name: str, cache_ttl: str | None, workers: int | None = ONE_PROCESS, **extra: str
    ) -> Iterator[Server]:
        """runpop3; ``cache_ttl`` and ``workers`` None leave the shipped defaults."""
        settings = {
            "POP3_MAX_CONNECTIONS": self.connection_limit,
            "POP3_MAX_CONNECTIONS_PER_IP": self.connection_limit,
            **extra,
        }
        if workers is not None:
            settings["POP3_WORKERS"] = str(workers)
        if cache_ttl is not None:
            settings["POP3_AUTH_CACHE_TTL"] = cache_ttl
        with self._running(start_pop3(self.env, name, self.certificate, **settings)) as server:
            yield server

    @contextmanager
    def lmtp(self, name: str) -> Iterator[Server]:
        """runlmtp as shipped (LMTP_WORKERS unset)."""
        with self._running(start_lmtp(self.env, name)) as server:
            yield server

    @contextmanager
    def dovecot(self, users: str = FLEET, passwd: str = PLAIN_PASSWORDS) -> Iterator[Dovecot]:
        """Dovecot on the Maildirs of ``users`` (``bench.maildirs``: exported from the bench
        database first), logging them in with the passwd-file ``passwd``."""
        root = make_root()
        try:
            self.env.run("-m", "bench.maildirs", str(self.spec_path), str(root), users)
            with self._running(Dovecot.start(root, self.certificate, passwd)) as server:
                yield server
        finally:
            remove_root(root, self.env.var_dir)

    def dovecot_beside(self, stack: ExitStack, scenarios: tuple[str, ...], passwd: str) -> Dovecot | None:
        """Dovecot on the corpus users, entered on ``stack`` if any of its ``scenarios`` is to run
        and it is installed; its indexes built by one login per user."""
        if missing() or not any(self.wants(name) for name in scenarios):
            return None
        dovecot = stack.enter_context(self.dovecot(CORPUS, passwd))
        warm_up(dovecot, self.spec.corpus_users, dovecot.worker_count())
        return dovecot

    @property
    def spec_path(self) -> Path:
        return self.env.var_dir / "corpus-spec.json"

    @contextmanager
    def web(self, name: str) -> Iterator[Server]:
        with self._running(start_web(self.env, name)) as server:
            yield server

    @contextmanager
    def _running(self, server: Server) -> Iterator[Server]:
        try:
            yield server
        finally:
            alive = server.process.poll() is None
            code = server.stop()
            self.servers[server.name] = {
                "settings": server.settings,
                "alive_at_end": alive,
                "exit_code": code,
                "problems": server.problems()[:50],
                "stderr": str(server.stderr_path),
            }

    def task(self, server: Server, users: list[str], start_at: float, *, tls: bool = False) -> Task:
        return Task(
            port=server.ports["tls" if tls else "plain"],
            users=tuple(users),
            password=corpus.PASSWORD,
            start_at=start_at,
            end_at=start_at + self.options.seconds,
            cafile=str(self.certificate[0]) if tls else "",
        )

    def spread(self, users: list[str]) -> list[list[str]]:
        """Mailboxes dealt out to the clients: a mailbox is locked by one session at a time."""
        hands = [users[k :: self.options.clients] for k in range(self.options.clients)]
        return [hand for hand in hands if hand]


# --- Helpers ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


@dataclass(frozen=True)
class Cpu:
    """Server CPU seconds spent inside a window; system time is mostly loopback TCP copies."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def figures(self) -> dict:
        return {
            "server_cpu_seconds": round(self.total, 3),
            "server_cpu_user_seconds": round(self.user, 3),
            "server_cpu_system_seconds": round(self.system, 3),
        }


def measure(
    bench: Bench, server: Server, worker: Callable[[Task], Tally], tasks: list[Task]
) -> tuple[Tally, Cpu]:
    """Run the workers over their window; return their tally and the server's CPU in it."""
    pending = bench.workers.start(worker, tasks)
    sleep_until(tasks[0].start_at)
    user_before, system_before = server.cpu_times()
    sleep_until(tasks[0].end_at)
    user_after, system_after = server.cpu_times()
    return bench.workers.collect(pending), Cpu(user_after - user_before, system_after - system_before)


def tally_figures(tally: Tally, seconds: float) -> dict:
    return {
        "seconds": seconds,
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "late_start_seconds": round(tally.late_start_seconds, 3),
    }


def login_once(port: int, user: str, cafile: Path | None = None) -> None:
    client = Pop3.connect(port, tls_context(cafile) if cafile else None)
    client.login(user, corpus.PASSWORD)
    client.quit()


def warm_up(server: Server, users: list[str], workers: int) -> float:
    """Log every user in (filling the credential cache); return the seconds it took.

    Each worker process has a cache of its own and the kernel picks the worker that accepts a
    connection, so with several workers every user logs in a few times per worker: with 2, 8
    logins miss one worker with a probability of 1 in 128.
    """
    rounds = 1 if workers == 1 else 4 * workers
    started = time.perf_counter()
    with ThreadPoolExecutor(OPENING_THREADS) as pool:
        for _ in range(rounds):  # a round at a time: a user's sessions must not overlap ([IN-USE])
            list(pool.map(lambda user: login_once(server.ports["plain"], user), users))
    return round(time.perf_counter() - started, 2)


def open_sessions(port: int, users: list[str], cafile: Path | None = None) -> tuple[list[Pop3], int]:
    """Authenticated sessions held open, opened a few at a time; (sessions, failures)."""
    context = tls_context(cafile) if cafile else None

    def open_one(user: str) -> Pop3 | None:
        try:
            client = Pop3.connect(port, context)
            client.login(user, corpus.PASSWORD)
            return client
        except (ProtocolError, OSError, EOFError):
            return None

    with ThreadPoolExecutor(OPENING_THREADS) as pool:
        opened = list(pool.map(open_one, users))
    sessions = [client for client in opened if client is not None]
    return sessions, len(opened) - len(sessions)


def quit_all(sessions: list[Pop3]) -> None:
    with ThreadPoolExecutor(OPENING_THREADS) as pool:
        list(pool.map(Pop3.quit, sessions))


# --- Throughput: RETR and logins ---------------------------------------------------------------


def retr(bench: Bench, server: Server, *, tls: bool = False) -> dict:
    start_at = time.time() + START_DELAY_SECONDS
    tasks = [bench.task(server, hand, start_at, tls=tls) for hand in bench.spread(bench.spec.corpus_users)]
    tally, cpu = measure(bench, server, retr_worker, tasks)
    seconds = bench.options.seconds
    return {
        "clients": len(tasks),
        "sessions": tally.operations,
        "messages": tally.messages,
        "octets": tally.octets,
        "msg_per_s": ratio(tally.messages, seconds),
        "mb_per_s": ratio(tally.octets, seconds * MB),
        **cpu.figures(),
        "cpu_ms_per_mb": ratio(cpu.total * 1000, tally.octets / MB),
        "login_p50_ms": ms(percentile(tally.latencies, 50)),
        "login_p99_ms": ms(percentile(tally.latencies, 99)),
        **tally_figures(tally, seconds),
    }


def logins(bench: Bench, server: Server) -> dict:
    start_at = time.time() + START_DELAY_SECONDS
    tasks = [bench.task(server, hand, start_at) for hand in bench.spread(bench.spec.corpus_users)]
    tally, cpu = measure(bench, server, login_worker, tasks)
    seconds = bench.options.seconds
    return {
        "clients": len(tasks),
        "logins": tally.operations,
        "logins_per_s": ratio(tally.operations, seconds),
        "p50_ms": ms(percentile(tally.latencies, 50)),
        "p99_ms": ms(percentile(tally.latencies, 99)),
        "max_ms": ms(max(tally.latencies, default=None)),
        **cpu.figures(),
        "cpu_ms_per_login": ratio(cpu.total * 1000, tally.operations),
        **tally_figures(tally, seconds),
    }


def beside(dovecot: Dovecot | None, action: Callable[[Dovecot], dict]) -> Callable[[], dict]:
    """A Dovecot scenario: ``action`` on it, or why it was skipped."""
    return lambda: action(dovecot) if dovecot is not None else _skipped(missing())


def group_cold(bench: Bench) -> dict[str, dict]:
    """POP3_AUTH_CACHE_TTL=0: every login pays a full argon2 verification; Dovecot beside it
    checks the same argon2 hashes (it has no cache unless configured)."""
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        server = stack.enter_context(bench.pop3("runpop3-cold", cache_ttl="0"))
        dovecot = bench.dovecot_beside(stack, ("dovecot_logins_cold",), ARGON2_HASHES)
        # Imports and first queries paid here, and both hashing threads' argon2 memory mapped.
        first_two = bench.spec.corpus_users[:2]
        with ThreadPoolExecutor(len(first_two)) as pool:
            list(pool.map(lambda user: login_once(server.ports["plain"], user), first_two))
        _run(results, bench, "logins_cold", lambda: logins(bench, server))
        _run(results, bench, "dovecot_logins_cold", beside(dovecot, lambda it: logins(bench, it)))
        _run(results, bench, "retr_cold", lambda: retr(bench, server))
    return results


def group_warm(bench: Bench) -> dict[str, dict]:
    """The credential cache on and warmed: logins skip argon2, as polling clients' do. Dovecot
    beside it logs in with {PLAIN} passwords."""
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        server = stack.enter_context(bench.pop3("runpop3-warm", cache_ttl=AS_SHIPPED, workers=AS_SHIPPED))
        dovecot = bench.dovecot_beside(stack, ("dovecot_logins_warm", "dovecot_pipelined"), PLAIN_PASSWORDS)
        users = bench.spec.corpus_users
        if bench.spec.large_mailbox_messages:
            users = users + [bench.spec.large_mailbox_user]
        warm_up_seconds = warm_up(server, users, server.worker_count())
        _run(
            results,
            bench,
            "logins_warm",
            lambda: {**logins(bench, server), "warm_up_seconds": warm_up_seconds},
        )
        _run(results, bench, "dovecot_logins_warm", beside(dovecot, lambda it: logins(bench, it)))
        _run(results, bench, "retr_plain", lambda: retr(bench, server))
        _run(results, bench, "retr_tls", lambda: retr(bench, server, tls=True))
        if bench.spec.large_mailbox_messages:
            _run(results, bench, "large_mailbox", lambda: large_mailbox(bench, server))
        _run(results, bench, "pipelined", lambda: pipelined(bench, server))
        _run(results, bench, "dovecot_pipelined", beside(dovecot, lambda it: pipelined(bench, it)))
    return results


# --- The large mailbox and pipelining --------------------------------------------------------


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _large_mailbox_session(port: int, user: str) -> tuple[int, dict[str, float]]:
    """One session's timings: PASS (the snapshot is taken at login), STAT, LIST, UIDL, RETR last."""
    client = Pop3.connect(port)
    client.command(f"USER {user}")
    started = time.perf_counter()
    client.command(f"PASS {corpus.PASSWORD}")
    logged_in = time.perf_counter()
    count, _ = client.stat()
    stat_done = time.perf_counter()
    timings = {
        "pass": logged_in - started,
        "stat": stat_done - logged_in,
        "login_to_stat": stat_done - started,
        "list": _timed(lambda: client.multiline("LIST")),
        "uidl": _timed(lambda: client.multiline("UIDL")),
        "retr_last": _timed(lambda: client.retr(count)),
    }
    client.quit()
    return count, timings


def large_mailbox(bench: Bench, server: Server) -> dict:
    """The large mailbox's timings: the median over a few sessions (the password cache is warm).

    A message is delivered to the mailbox first, so the first session's snapshot is read from
    the database and its LIST made afresh (``first_login_to_stat_s``, ``first_list_s``), as
    after any delivery or deletion. Nothing changes after it, so once each worker has read it
    again runpop3 takes the snapshot it kept, with its LIST and UIDL replies
    (``mailadmin.pop3d.snapshots``): the median is a client returning to find nothing new.
    """
    user = bench.spec.large_mailbox_user
    bench.env.run("manage.py", "deliver", user, input=f"To: {user}\r\nSubject: since\r\n\r\nnew\r\n")
    sessions = [_large_mailbox_session(server.ports["plain"], user) for _ in range(bench.options.repeats)]
    figures: dict = {"messages": sessions[0][0], "repeats": len(sessions)}
    figures["first_login_to_stat_s"] = round(sessions[0][1]["login_to_stat"], 6)
    figures["first_list_s"] = round(sessions[0][1]["list"], 6)
    for name in sessions[0][1]:
        figures[f"{name}_s"] = round(statistics.median(timings[name] for _, timings in sessions), 6)
    figures["samples_s"] = {name: [round(t[name], 6) for _, t in sessions] for name in sessions[0][1]}
    return figures


def pipelined(bench: Bench, server: Server | Dovecot) -> dict:
    """``pipelined`` alternating LIST n / UIDL n in one write: time until every reply arrived.

    On ``user00`` (40 messages), which Dovecot serves too: looking a message up costs neither
    server more in a larger mailbox, and the large one is not exported to Dovecot.
    """
    user = bench.spec.user(0)
    client = Pop3.connect(server.ports["plain"])
    client.login(user, corpus.PASSWORD)
    count, _ = client.stat()
    commands = [
        f"{'LIST' if i % 2 == 0 else 'UIDL'} {i // 2 % count + 1}\r\n" for i in range(bench.options.pipelined)
    ]
    batch = "".join(commands).encode()

    def exchange() -> None:
        client.send(batch)
        for _ in commands:
            client.expect_ok(client.line())

    exchange()  # the first round warms the code paths
    user_before, system_before = server.cpu_times()
    samples = [_timed(exchange) for _ in range(bench.options.repeats)]
    user_after, system_after = server.cpu_times()
    client.quit()
    cpu = Cpu(user_after - user_before, system_after - system_before)
    return {
        "mailbox": user,
        "commands": len(commands),
        "bytes_sent": len(batch),
        "seconds": round(statistics.median(samples), 6),
        "samples_s": [round(s, 6) for s in samples],
        **cpu.figures(),
        # The server's CPU per round: what the load average moves least (clock ticks of 10 ms,
        # so only meaningful over many rounds: --repeats 30 or more).
        "cpu_ms_per_round": ratio(cpu.total * 1000, len(samples)),
    }


# --- Memory: idle and held sessions, concurrent large RETRs ----------------------------------


def _memory(server: Server) -> dict[str, int]:
    return {"rss_kib": server.status_kib("VmRSS"), "pss_kib": server.pss_kib()}


def _per_session(before: dict[str, int], after: dict[str, int], sessions: int) -> dict:
    return {
        "sessions": sessions,
        "before": before,
        "after": after,
        "pss_kib_per_session": ratio(after["pss_kib"] - before["pss_kib"], sessions),
        "rss_kib_per_session": ratio(after["rss_kib"] - before["rss_kib"], sessions),
    }


def _idle(bench: Bench, server: Server, users: list[str], tls: bool) -> tuple[dict, list[Pop3]]:
    before = _memory(server)
    started = time.perf_counter()
    port = server.ports["tls" if tls else "plain"]
    sessions, failures = open_sessions(port, users, bench.certificate[0] if tls else None)
    opening = time.perf_counter() - started
    time.sleep(SETTLE_SECONDS)
    figures = _per_session(before, _memory(server), len(sessions))
    figures.update(requested=len(users), failures=failures, opening_seconds=round(opening, 2))
    return figures, sessions


def _sent_capa(clients: list[Pop3]) -> list[Pop3]:
    """CAPA written to every connection first, so the server answers them all at once."""
    for client in clients:
        client.send(b"CAPA\r\n")
    return clients


def _answers_capa(client: Pop3) -> bool:
    try:
        client.expect_ok(client.line())
        client.skip_body()
    except (ProtocolError, OSError, EOFError):
        return False
    return True


def held_sessions(bench: Bench, server: Server) -> dict:
    """Greeted, unauthenticated plain connections held at once; is the server still serving?"""
    before = _memory(server)
    held: list[Pop3] = []
    failure = ""
    started = time.perf_counter()
    try:
        for _ in range(bench.options.held_sessions):
            held.append(Pop3.connect(server.ports["plain"]))
    except (ProtocolError, OSError, EOFError) as error:
        failure = f"{type(error).__name__}: {error}"
    opening = time.perf_counter() - started
    try:
        time.sleep(SETTLE_SECONDS)
        figures = _per_session(before, _memory(server), len(held))
        login_seconds = _timed(lambda: login_once(server.ports["plain"], bench.spec.user(0)))
        answered = sum(_answers_capa(client) for client in _sent_capa(held))
    finally:
        for client in held:
            client.close()
    figures.update(
        requested=bench.options.held_sessions,
        held=len(held),
        answered_capa=answered,
        failure=failure,
        opening_seconds=round(opening, 2),
        login_while_held_ms=ms(login_seconds),
    )
    return figures


def group_sessions(bench: Bench) -> dict[str, dict]:
    """Idle sessions, plain and then TLS on top of them, then held connections.

    TLS sessions open while the plain ones are still held, and on other mailboxes (a session
    locks its mailbox), so neither figure benefits from memory the other freed.
    """
    results: dict[str, dict] = {}
    count = bench.options.idle_sessions
    opened: list[Pop3] = []
    with bench.pop3("runpop3-sessions", cache_ttl=CACHE_ON_TTL) as server:

        def idle(first: int, tls: bool) -> dict:
            users = [bench.spec.idle_user(i) for i in range(first, first + count)]
            figures, sessions = _idle(bench, server, users, tls)
            opened.extend(sessions)
            return figures

        # Two logins at once: both hashing threads map their argon2 memory, kept for the life of
        # the process, before the baseline is read; then one over TLS.
        first_two = bench.spec.corpus_users[:2]
        with ThreadPoolExecutor(len(first_two)) as pool:
            list(pool.map(lambda user: login_once(server.ports["plain"], user), first_two))
        login_once(server.ports["tls"], bench.spec.user(0), bench.certificate[0])
        time.sleep(SETTLE_SECONDS)
        try:
            _run(results, bench, "idle_plain", lambda: idle(0, tls=False))
            _run(results, bench, "idle_tls", lambda: idle(count, tls=True))
        finally:
            quit_all(opened)
        _run(results, bench, "held_sessions", lambda: held_sessions(bench, server))
    return results


def memory_25mb(bench: Bench, server: Server) -> dict:
    """Peak RSS growth while every big user RETRs the big message at once."""
    users = [bench.spec.big_user(i) for i in range(bench.spec.big_users)]
    warm_up(server, users, workers=1)  # argon2's 100 MiB per check must not land in the measured peak
    time.sleep(SETTLE_SECONDS)
    baseline = server.reset_peak_rss()
    barrier = threading.Barrier(len(users))

    def fetch(user: str) -> tuple[int, float]:
        client = Pop3.connect(server.ports["plain"])
        client.login(user, corpus.PASSWORD)
        barrier.wait()
        started = time.perf_counter()
        octets = client.retr(1)
        elapsed = time.perf_counter() - started
        client.quit()
        return octets, elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(len(users)) as pool:
        fetched = list(pool.map(fetch, users))
    wall = time.perf_counter() - started
    peak = server.status_kib("VmHWM")
    octets = sum(o for o, _ in fetched)
    return {
        "clients": len(users),
        "message_octets": bench.spec.big_message_bytes,
        "octets_received": octets,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": peak,
        "rss_after_kib": server.status_kib("VmRSS"),
        "peak_growth_mib": round((peak - baseline) / 1024, 1),
        "wall_seconds": round(wall, 3),
        "slowest_retr_seconds": round(max(elapsed for _, elapsed in fetched), 3),
        "mb_per_s": ratio(octets, wall * MB),
    }


def group_memory(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with bench.pop3("runpop3-memory", cache_ttl=CACHE_ON_TTL) as server:
        _run(results, bench, "memory_25mb", lambda: memory_25mb(bench, server))
    return results


# --- LMTP --------------------------------------------------------------------------------------


def lmtp(bench: Bench, server: Server) -> dict:
    sinks = [bench.spec.sink_user(i) for i in range(bench.spec.sink_users)][: bench.options.clients]
    message = corpus.text_message(random.Random(bench.spec.seed), sinks[0], 0, bench.spec.small_bytes)
    start_at = time.time() + START_DELAY_SECONDS
    tasks = [
        Task(
            port=server.ports["lmtp"],
            users=(sink,),
            password="",
            start_at=start_at,
            end_at=start_at + bench.options.seconds,
            message=message,
            sender=corpus.SENDER,
        )
        for sink in sinks
    ]
    tally, cpu = measure(bench, server, lmtp_worker, tasks)
    seconds = bench.options.seconds
    return {
        "connections": len(tasks),
        "message_octets": len(message),
        "delivered": tally.operations,
        "msg_per_s": ratio(tally.operations, seconds),
        "p50_ms": ms(percentile(tally.latencies, 50)),
        "p99_ms": ms(percentile(tally.latencies, 99)),
        **cpu.figures(),
        "cpu_ms_per_msg": ratio(cpu.total * 1000, tally.operations),
        **tally_figures(tally, seconds),
    }


def group_lmtp(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with bench.lmtp("runlmtp") as server:
        _run(results, bench, "lmtp", lambda: lmtp(bench, server))
        _run(results, bench, "deliver_pipe", lambda: deliver_pipe(bench, server))
    return results


# --- Provisioning API --------------------------------------------------------------------------


def api_put(bench: Bench, server: Server, token: str, password_hash: str) -> dict:
    """PUT creating a new mailbox each time, with a pre-hashed password."""

    def request(client: int, n: int) -> tuple:
        body = {"password_hash": password_hash, "quota_bytes": 10**9}
        return "PUT", f"mailboxes/put-{client}-{n}@{api.DOMAIN}", body, {201}

    return _api_window(bench, server, token, request)


def api_get(bench: Bench, server: Server, token: str, created: dict[int, int]) -> dict:
    """GET of the mailboxes the PUT scenario created (``created``: how many by each client),
    driven by wrk where it is installed, by the Python clients otherwise."""
    made = [(client, count) for client, count in sorted(created.items()) if count]
    if not made:
        raise RuntimeError("api_get reads what api_put created: run them together")
    if api.wrk_missing():
        return {**_api_window(bench, server, token, _get_of(made)), "client": "python threads"}
    paths = [f"mailboxes/put-{owner}-{n}@{api.DOMAIN}" for owner, count in made for n in range(count)]
    seconds, port = bench.options.seconds, server.ports["http"]
    user_before, system_before = server.cpu_times()
    report = api.run_wrk(port, token, paths, bench.options.clients, seconds, bench.env.var_dir / "get.lua")
    user_after, system_after = server.cpu_times()
    cpu = Cpu(user_after - user_before, system_after - system_before)
    return {
        "client": "wrk",
        "requests": report.requests,
        "req_per_s": ratio(report.requests, seconds),
        "p50_ms": ms(report.p50_seconds),
        "p99_ms": ms(report.p99_seconds),
        **cpu.figures(),
        "cpu_ms_per_request": ratio(cpu.total * 1000, report.requests),
        "seconds": seconds,
        "errors": report.errors,
        "error_samples": report.error_samples,
    }


def _get_of(made: list[tuple[int, int]]):
    def request(client: int, n: int) -> tuple:
        owner, count = made[client % len(made)]
        return "GET", f"mailboxes/put-{owner}-{n % count}@{api.DOMAIN}", None, {200}

    return request


def _api_window(bench: Bench, server: Server, token: str, request) -> dict:
    seconds, port = bench.options.seconds, server.ports["http"]
    user_before, system_before = server.cpu_times()
    tally = api.run_clients(port, token, bench.options.clients, seconds, request)
    user_after, system_after = server.cpu_times()
    cpu = Cpu(user_after - user_before, system_after - system_before)
    return api.figures(tally, seconds, cpu, percentile, ms, ratio)


def api_import(bench: Bench, server: Server, token: str, password_hash: str) -> dict:
    """One POST mailboxes/import of ``import_rows`` pre-hashed mailboxes: all in one transaction."""
    rows = [
        {"address": f"import-{n}@{api.DOMAIN}", "password_hash": password_hash}
        for n in range(bench.options.import_rows)
    ]
    client = api.Client(server.ports["http"], token)
    user_before, system_before = server.cpu_times()
    started = time.perf_counter()
    status, body = client.request("POST", "mailboxes/import", rows)
    seconds = time.perf_counter() - started
    user_after, system_after = server.cpu_times()
    client.close()
    created = json.loads(body).get("count") if status == 201 else None
    return {
        "rows": len(rows),
        "created": created,
        "seconds": round(seconds, 3),
        "rows_per_s": ratio(len(rows), seconds),
        **Cpu(user_after - user_before, system_after - system_before).figures(),
        "errors": 0 if status == 201 and created == len(rows) else 1,
        "error_samples": [] if status == 201 else [f"{status} {body[:300]!r}"],
    }


def api_token_check(bench: Bench, token: str) -> dict:
    result = bench.env.run("-m", "bench.tokencheck", token, str(bench.options.token_checks))
    return json.loads(result.stdout.splitlines()[-1])


def group_api(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    password_hash = api.argon2_hash(api.PASSWORD)
    with api.api_server(bench) as (server, token):
        _run(results, bench, "api_put", lambda: api_put(bench, server, token, password_hash))
        created = results.get("api_put", {}).get("successes_by_client", {})
        _run(results, bench, "api_get", lambda: api_get(bench, server, token, created))
        _run(results, bench, "api_import", lambda: api_import(bench, server, token, password_hash))
    # Apart from the server: a write it still has in hand must not stall the checks.
    _run(results, bench, "api_token_check", lambda: api_token_check(bench, token))
    return results


# --- The console: pages at scale, prunehistory beside a writer --------------------------------


def console_dashboard(bench: Bench, spec: console.ConsoleSpec) -> dict:
    spec_path, out = bench.env.var_dir / "console-spec.json", bench.env.var_dir / "console-pages.json"
    console.write_spec(spec, spec_path)
    bench.env.run("-m", "bench.console", "pages", str(spec_path), str(out))
    pages = json.loads(out.read_text())
    figures: dict = {"pages": pages}
    for name, timing in pages.items():
        figures[f"{name}_ms"] = timing.get("median_ms")
        figures[f"{name}_max_ms"] = timing.get("max_ms")
    return figures


def console_prune(bench: Bench) -> dict:
    """``prunehistory --days 0`` (every ended session, every failed login) while a writer writes."""
    stop, out = bench.env.var_dir / "writer.stop", bench.env.var_dir / "writer.json"
    traced = bench.env.var_dir / "prune.json"
    stop.unlink(missing_ok=True)
    writer = subprocess.Popen(
        [sys.executable, "-m", "bench.console", "writer", str(out), str(stop)],
        cwd=PROJECT_DIR,
        env=bench.env.variables(),
    )
    try:
        time.sleep(SMOKE_CONTROL_SECONDS if bench.options.smoke else WRITER_CONTROL_SECONDS)
        started, wall_started = time.perf_counter(), time.time()
        bench.env.run("-m", "bench.console", "prune", str(traced))
        seconds, wall_ended = time.perf_counter() - started, time.time()
        time.sleep(WRITER_TAIL_SECONDS)
    finally:
        stop.touch()
        writer.wait(timeout=120)
    prune = json.loads(traced.read_text())
    removed = [int(word) for word in prune["output"].split() if word.isdigit()]
    samples = json.loads(out.read_text())["samples"]
    return {
        "output": prune["output"],
        "rows_removed": sum(removed[:2]),
        "prune_seconds": round(seconds, 1),
        "rows_per_s": ratio(sum(removed[:2]), seconds),
        **console.write_figures(samples, wall_started, wall_ended, prune["holds"]),
    }


def group_console(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    spec = console.ConsoleSpec.smoke() if bench.options.smoke else console.ConsoleSpec()
    spec_path, out = bench.env.var_dir / "console-spec.json", bench.env.var_dir / "console-seed.json"
    console.write_spec(spec, spec_path)
    print(f"  seeding {spec.mailboxes:,} mailboxes and {spec.sessions:,} sessions ...", flush=True)
    bench.env.run("-m", "bench.console", "seed", str(spec_path), str(out))
    seeded = {**json.loads(out.read_text()), "spec": asdict(spec)}
    _run(results, bench, "console_dashboard", lambda: {**console_dashboard(bench, spec), **seeded})
    _run(results, bench, "console_prune", lambda: console_prune(bench))
    return results


# --- The fleet: runpop3 and Dovecot, as shipped, in the same run --------------------------------


def fleet(
    bench: Bench, server: Server | Dovecot, expected: dict[str, frozenset], *, tls: bool = False
) -> dict:
    """Every client logs in to its mailboxes in turn, RETRs each message, checks its bytes, QUITs."""
    start_at = time.time() + START_DELAY_SECONDS
    tasks = [
        replace(bench.task(server, hand, start_at, tls=tls), expected={user: expected[user] for user in hand})
        for hand in bench.spread(bench.spec.fleet)
    ]
    tally, cpu = measure(bench, server, fleet_worker, tasks)
    seconds = bench.options.seconds
    return {
        "server": server.name,
        "workers": server.worker_count(),
        "clients": len(tasks),
        "sessions": tally.operations,
        "messages": tally.messages,
        "octets": tally.octets,
        "msg_per_s": ratio(tally.messages, seconds),
        "mb_per_s": ratio(tally.octets, seconds * MB),
        **cpu.figures(),
        "cpu_ms_per_mb": ratio(cpu.total * 1000, tally.octets / MB),
        "retr_p50_ms": ms(percentile(tally.retr_latencies, 50)),
        "retr_p99_ms": ms(percentile(tally.retr_latencies, 99)),
        "retr_mean_ms": ms(statistics.fmean(tally.retr_latencies)) if tally.retr_latencies else None,
        "login_p50_ms": ms(percentile(tally.latencies, 50)),
        "login_p99_ms": ms(percentile(tally.latencies, 99)),
        **tally_figures(tally, seconds),
    }


def _expected(root: Path) -> dict[str, frozenset]:
    found = json.loads((root / "expected.json").read_text())
    return {user: frozenset(map(tuple, pairs)) for user, pairs in found.items()}


def _skipped(reason: str) -> dict:
    print(f"    skipped: {reason}", flush=True)
    return {"skipped": reason}


def group_fleet(bench: Bench) -> dict[str, dict]:
    """The issue's workload on runpop3 (as shipped) and on Dovecot, alternating, both running.

    Both are warmed first: runpop3's credential cache in every worker, Dovecot's indexes.
    """
    results: dict[str, dict] = {}
    reason = missing()
    with ExitStack() as stack:
        server = stack.enter_context(bench.pop3("runpop3-fleet", cache_ttl=AS_SHIPPED, workers=AS_SHIPPED))
        dovecot = None if reason else stack.enter_context(bench.dovecot())
        if dovecot is not None:
            expected = _expected(dovecot.root)
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            bench.env.run("-m", "bench.maildirs", str(bench.spec_path), str(scratch), "--expected-only")
            expected = _expected(scratch)
        warm_up_seconds = warm_up(server, bench.spec.fleet, server.worker_count())
        if dovecot is not None:
            warm_up(dovecot, bench.spec.fleet, dovecot.worker_count())
        for tls in (False, True):
            kind = "tls" if tls else "plain"
            _run(
                results,
                bench,
                f"fleet_{kind}",
                lambda tls=tls: {
                    **fleet(bench, server, expected, tls=tls),
                    "warm_up_seconds": warm_up_seconds,
                },
            )
            _run(
                results,
                bench,
                f"dovecot_fleet_{kind}",
                lambda tls=tls: fleet(bench, dovecot, expected, tls=tls) if dovecot else _skipped(reason),
            )
        _run(results, bench, "dovecot_lmtp", lambda: lmtp(bench, dovecot) if dovecot else _skipped(reason))
    return results


# --- Pipe delivery ------------------------------------------------------------------------------


def _pipe_delivery(
    bench: Bench, recipient: str, message: bytes, where: dict[str, str]
) -> tuple[float, float, str]:
    """One ``manage.py deliver``: its wall time, its own CPU time (user and system: steadier than
    wall time on a busy machine), and the path it took (from what it printed)."""
    cpu_before = _children_cpu_seconds()
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "manage.py", "deliver", "--sender", corpus.SENDER, recipient],
        input=message,
        capture_output=True,
        cwd=PROJECT_DIR,
        env=bench.env.variables(**where),
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    cpu = _children_cpu_seconds() - cpu_before
    if result.returncode != 0:
        raise RuntimeError(f"deliver exited {result.returncode}: {result.stderr.decode(errors='replace')}")
    return elapsed, cpu, "in-process" if b" delivered as " in result.stdout else "runlmtp"


def _children_cpu_seconds() -> float:
    """CPU time of the bench's children that have ended (a finished ``deliver`` among them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def deliver_pipe(bench: Bench, server: Server) -> dict:
    """``manage.py deliver`` one message at a time: through the running runlmtp, then with no
    runlmtp to reach (the in-process path, Django started for each message)."""
    recipient = bench.spec.sink_user(0)
    message = corpus.text_message(random.Random(bench.spec.seed), recipient, 0, bench.spec.small_bytes)
    paths = {
        "runlmtp": {"LMTP_BIND": "127.0.0.1", "LMTP_PORT": str(server.ports["lmtp"]), "LMTP_SOCKET": ""},
        "in-process": {"LMTP_BIND": "127.0.0.1", "LMTP_PORT": "1", "LMTP_SOCKET": ""},
    }
    count = bench.options.pipe_deliveries
    counts = {"runlmtp": count, "in-process": max(1, count // 4)}
    figures: dict = {"message_octets": len(message)}
    for path, where in paths.items():
        samples = [_pipe_delivery(bench, recipient, message, where) for _ in range(counts[path])]
        taken = {taken for _, _, taken in samples}
        if taken != {path}:
            raise RuntimeError(f"deliveries meant for {path} took {sorted(taken)}")
        times, cpu = [elapsed for elapsed, _, _ in samples], [cpu for _, cpu, _ in samples]
        key = "fast" if path == "runlmtp" else "in_process"
        figures[f"{key}_deliveries"] = len(times)
        figures[f"{key}_median_ms"] = ms(statistics.median(times))
        figures[f"{key}_max_ms"] = ms(max(times))
        figures[f"{key}_cpu_median_ms"] = ms(statistics.median(cpu))
        figures[f"{key}_samples_ms"] = [ms(t) for t in times]
    figures["speed_up"] = ratio(figures["in_process_median_ms"], figures["fast_median_ms"])
    figures["cpu_ratio"] = ratio(figures["in_process_cpu_median_ms"], figures["fast_cpu_median_ms"])
    return figures


# --- The live sessions page ------------------------------------------------------------------


LIVE_HOLD_SECONDS = "7200"


def live_page(bench: Bench, pop3: Server, web: Server) -> dict:
    """Delay from a POP3 login to its row on an open live page, while held sessions churn."""
    port = pop3.ports["plain"]
    users = [bench.spec.idle_user(i) for i in range(min(bench.options.live_sessions, bench.spec.idle_users))]
    held = live.hold(port, users)
    churn = live.Churn(port, held)
    session_key = bench.env.run("-m", "bench.staff_session").stdout.strip()
    page = live.LivePage(web.ports["http"], session_key)
    probes = bench.options.live_probes
    delays: list[float] = []
    missed = 0
    waits = random.Random(bench.spec.seed)  # the same waits in every run
    churn.start()
    started = time.perf_counter()
    try:
        for n in range(probes):
            delay = live.probe(page, port, bench.spec.user(n % bench.spec.users), waits.uniform(0.0, 1.0))
            if delay is None:
                missed += 1
            else:
                delays.append(delay)
    finally:
        seconds = time.perf_counter() - started
        churn.stop()
        page.close()
        quit_all(list(churn.sessions.values()))
    return {
        "held_sessions": len(users),
        "open_failures": len(users) - len(held),
        "churn_logins_per_s": ratio(churn.cycles, seconds),
        "churn_errors": churn.errors,
        "probes": probes,
        "missed": missed,
        "p50_ms": ms(percentile(delays, 50)),
        "p95_ms": ms(percentile(delays, 95)),
        "max_ms": ms(max(delays, default=None)),
        "page_messages": page.messages,
    }


def group_live(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    # Opening 1,000 sessions (an argon2 check each) can take longer than the idle timeout and
    # the credential cache's TTL on a busy machine: neither may lapse before the churn starts.
    with (
        bench.pop3("runpop3-live", cache_ttl=LIVE_HOLD_SECONDS, POP3_IDLE_TIMEOUT=LIVE_HOLD_SECONDS) as pop3,
        bench.web("daphne-live") as web,
    ):
        _run(results, bench, "live_page", lambda: live_page(bench, pop3, web))
    return results


# --- Running them -----------------------------------------------------------------------------


def _run(results: dict[str, dict], bench: Bench, scenario: str, action: Callable[[], dict]) -> None:
    """Run one scenario if selected; a failure is recorded with its traceback, not raised."""
    if not bench.wants(scenario):
        return
    print(f"  {scenario} ...", flush=True)
    started = time.perf_counter()
    try:
        results[scenario] = action()
    except Exception:
        results[scenario] = {"error": traceback.format_exc()}
    results[scenario]["scenario_seconds"] = round(time.perf_counter() - started, 2)


GROUPS: dict[str, tuple[tuple[str, ...], Callable[[Bench], dict[str, dict]]]] = {
    "cold": (("logins_cold", "dovecot_logins_cold", "retr_cold"), group_cold),
    "warm": (
        (
            "logins_warm",
            "dovecot_logins_warm",
            "retr_plain",
            "retr_tls",
            "large_mailbox",
            "pipelined",
            "dovecot_pipelined",
        ),
        group_warm,
    ),
    "fleet": (
        ("fleet_plain", "dovecot_fleet_plain", "fleet_tls", "dovecot_fleet_tls", "dovecot_lmtp"),
        group_fleet,
    ),
    "sessions": (("idle_plain", "idle_tls", "held_sessions"), group_sessions),
    "memory": (("memory_25mb",), group_memory),
    "lmtp": (("lmtp", "deliver_pipe"), group_lmtp),
    "console_pages": ((console_pages.SCENARIO,), console_pages.group_console_pages),
    "api": (("api_put", "api_get", "api_import", "api_token_check"), group_api),
    "live": (("live_page",), group_live),
    # Last: its million rows would weigh on the mail scenarios' database.
    "console": (("console_dashboard", "console_prune"), group_console),
}
SCENARIOS = tuple(name for names, _ in GROUPS.values() for name in names)


def run_all(bench: Bench) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for group, (names, run_group) in GROUPS.items():
        if not any(bench.wants(name) for name in names):
            continue
        print(f"[{group}]", flush=True)
        try:
            results.update(run_group(bench))
        except Exception:
            results[f"group_{group}"] = {"error": traceback.format_exc()}
    return results
