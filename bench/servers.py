"""The bench's database, certificate and server processes, and what /proc says about them."""

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

PROJECT_DIR = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Lines of a server's stderr that mean something went wrong (LOG_LEVEL is WARNING).
PROBLEM = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")

# Settings every bench server runs with: no failure delays or penalties, the monitor at its
# default tick, quiet logs. The cache TTL is chosen per scenario.
BENCH_SETTINGS = {
    "POP3_AUTH_FAILURE_DELAY": "0",
    "POP3_AUTH_PENALTY_MAX": "0",
    "POP3_MONITOR_INTERVAL": "1",
    "LOG_LEVEL": "WARNING",
}


# --- Database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """A database of the bench's own: a fresh SQLite file, or a dedicated PostgreSQL database."""

    url: str  # what the children connect to
    label: str  # "sqlite" or "postgresql"
    path: Path | None = None  # the SQLite file
    admin_url: str = ""  # PostgreSQL: the maintenance database, for CREATE and DROP
    name: str = ""  # PostgreSQL: the bench database's name

    @classmethod
    def create(cls, configured_url: str, directory: Path) -> "Database":
        if not configured_url:
            path = directory / "bench.sqlite3"
            database = cls(f"sqlite:///{path}", "sqlite", path=path)
        else:
            parts = urlsplit(configured_url)
            if not parts.scheme.startswith("postgres"):
                raise SystemExit(
                    f"DATABASE_URL must be a PostgreSQL URL (or unset for SQLite): {configured_url}"
                )
            name = (parts.path.lstrip("/") or "mailadmin") + "_bench"
            database = cls(
                urlunsplit(parts._replace(path=f"/{name}")),
                "postgresql",
                admin_url=urlunsplit(parts._replace(path="/postgres")),
                name=name,
            )
        database.drop()
        if database.name:
            database._admin(f'CREATE DATABASE "{database.name}"')
        return database

    def drop(self) -> None:
        if self.path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        else:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def size_bytes(self) -> int:
        if self.path is not None:
            files = [Path(f"{self.path}{suffix}") for suffix in ("", "-wal")]
            return sum(file.stat().st_size for file in files if file.exists())
        with psycopg.connect(self.admin_url) as connection:
            return connection.execute("SELECT pg_database_size(%s)", [self.name]).fetchone()[0]

    def _admin(self, statement: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(statement)


# --- Child processes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    """What every child (manage.py, the corpus builder, the servers) runs with."""

    database_url: str
    var_dir: Path
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(50))

    def variables(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "mailadmin.settings",
            "DATABASE_URL": self.database_url,
            "DEBUG": "0",  # DEBUG would keep every query in memory and skew the figures
            "SECRET_KEY": self.secret_key,
            "MAILADMIN_VAR_DIR": str(self.var_dir),
            "PYTHONUNBUFFERED": "1",
            **BENCH_SETTINGS,
            **extra,
        }

    def run(self, *args: str, timeout: float = 3600, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a Python module or script with the project's interpreter; fail loudly."""
        result = subprocess.run(
            [sys.executable, *args],
            cwd=PROJECT_DIR,
            env=self.variables(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if result.returncode:
            raise SystemExit(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1; the client trusts it as its own CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is needed for the TLS scenarios")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", f"subjectAltName=DNS:localhost,IP:{HOST}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running ``manage.py runpop3`` or ``runlmtp`` child, with its ports and /proc readings."""

    name: str
    process: subprocess.Popen
    ports: dict[str, int]
    stderr_path: Path
    settings: dict[str, str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def worker_count(self) -> int:
        """Processes serving connections: the workers (``--workers``), or the server itself."""
        return len(_children(self.pid)) or 1

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far of every thread of the server and its workers."""
        user = system = 0
        for pid in [self.pid, *_children(self.pid)]:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:  # a worker that just ended
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
        return user / CLOCK_TICKS, system / CLOCK_TICKS

    def status_kib(self, key: str) -> int:
        """A ``/proc/PID/status`` figure in KiB: VmRSS (now) or VmHWM (peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise KeyError(key)

    def pss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
        raise KeyError("Pss")

    def reset_peak_rss(self) -> int:
        """Set VmHWM back to the current RSS (Linux ``clear_refs`` 5); return it in KiB."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.status_kib("VmHWM")

    def problems(self) -> list[str]:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return [line for line in text.splitlines() if PROBLEM.search(line)]

    def stop(self) -> int:
        """SIGTERM and wait: the exit code (0 is a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _await_lines(process: subprocess.Popen, expected: list[str], stderr_path: Path) -> None:
    """Wait until the server printed every expected 'listening' line (or died); what it prints
    afterwards (a web server's access log) is read and dropped, so it never fills the pipe."""
    arrived: queue.Queue[str] = queue.Queue()
    waiting = threading.Event()
    waiting.set()

    def pump() -> None:
        for raw in process.stdout:
            if waiting.is_set():
                arrived.put(raw.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    missing = list(expected)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while missing:
        try:
            line = arrived.get(timeout=0.1)
        except queue.Empty:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"server did not start:\n{stderr_path.read_text(errors='replace')}"
                ) from None
            continue
        missing = [text for text in missing if text not in line]
    waiting.clear()


def start_pop3(env: Environment, name: str, certificate: tuple[Path, Path], **settings: str) -> Server:
    def attempt() -> Server:
        ports = {"plain": free_port(), "tls": free_port()}
        command = [
            "manage.py", "runpop3", "--bind", HOST,
            "--port", str(ports["plain"]), "--tls-port", str(ports["tls"]),
            "--certfile", str(certificate[0]), "--keyfile", str(certificate[1]),
        ]  # fmt: skip
        expected = [f"POP3 listening on {HOST}:{ports['plain']}", f"POP3S listening on {HOST}:{ports['tls']}"]
        return _start(env, name, command, ports, expected, settings)

    return _with_retries(attempt)


def _children(pid: int) -> list[int]:
    """Worker processes (``--workers``): the direct children of every thread of ``pid``."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return children


def start_lmtp(env: Environment, name: str, **settings: str) -> Server:
    def attempt() -> Server:
        port = free_port()
        command = ["manage.py", "runlmtp", "--bind", HOST, "--port", str(port)]
        return _start(env, name, command, {"lmtp": port}, [f"LMTP listening on {HOST}:{port}"], settings)

    return _with_retries(attempt)


def _with_retries(attempt: Callable[[], Server], attempts: int = 3) -> Server:
    """A free port may be taken by someone else before the child binds it: try new ports."""
    for _ in range(attempts - 1):
        try:
            return attempt()
        except RuntimeError as error:
            if "cannot listen" not in str(error):
                raise
    return attempt()


def _start(
    env: Environment,
    name: str,
    command: list[str],
    ports: dict[str, int],
    expected: list[str],
    settings: dict[str, str],
) -> Server:
    stderr_path = env.var_dir / f"{name}.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, *command],
            cwd=PROJECT_DIR,
            env=env.variables(**settings),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    _await_lines(process, expected, stderr_path)
    return Server(name, process, ports, stderr_path, settings)


def start_web(env: Environment, name: str, **settings: str) -> Server:
    """``runweb`` (daphne in WEB_WORKERS processes, ``auto`` unless ``settings`` say otherwise)
    serving the admin, the console and the API, as ``make run`` starts it, on a free port, plain
    HTTP; ready once every worker serves (runweb says so)."""

    def attempt() -> Server:
        port = free_port()
        command = ["manage.py", "runweb", "--bind", HOST, "--port", str(port)]
        # DEBUG is off in the bench, which would redirect plain HTTP to HTTPS.
        values = {"SECURE_SSL_REDIRECT": "0", **settings}
        stderr_path = env.var_dir / f"{name}.stderr"
        with stderr_path.open("wb") as stderr:
            process = subprocess.Popen(  # its access log (stdout after the first line) is dropped
                [sys.executable, *command],
                cwd=PROJECT_DIR,
                env=env.variables(**values),
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        _await_lines(process, ["Web listening on"], stderr_path)
        return Server(name, process, {"http": port}, stderr_path, values)

    return _with_retries(attempt)
