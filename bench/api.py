"""The provisioning API's scenarios, against a daphne child serving the bench database.

``PUT`` creates mailboxes with a pre-hashed (argon2) password, ``GET`` reads them back, one
``POST mailboxes/import`` creates ``import_rows`` pre-hashed mailboxes, and ``bench.tokencheck``
times the Bearer check itself (CPU per request, database look-ups included). Clients are
threads keeping one HTTP/1.1 connection each; the GET load comes from wrk where it is installed,
whose client costs the shared cores far less than a Python one.
"""

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import argon2

from bench.servers import HOST, Server, start_web

DOMAIN = "api-bench.test"
PASSWORD = "api bench password"
# Long enough for the import of 10,000 rows on a busy machine.
REQUEST_TIMEOUT_SECONDS = 600


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    # Requests answered as expected, by client number (what each PUT client created).
    successes: dict[int, int] = field(default_factory=dict)


def argon2_hash(password: str) -> str:
    """A hash as Django's Argon2PasswordHasher makes it (its parameters, its ``argon2`` prefix)."""
    return "argon2" + argon2.PasswordHasher(time_cost=2, memory_cost=102400, parallelism=8).hash(password)


class Client:
    """One keep-alive connection sending the token with every request."""

    def __init__(self, port: int, token: str) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_SECONDS)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def request(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        payload = None if body is None else json.dumps(body).encode()
        self.connection.request(method, f"/api/v1/{path}", body=payload, headers=self.headers)
        response = self.connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.connection.close()


def run_clients(
    port: int, token: str, clients: int, seconds: float, make_request: Callable[[int, int], tuple]
) -> Tally:
    """``clients`` threads sending ``make_request(client, n)`` (method, path, body, expected
    statuses) for ``seconds``; the tally of all."""
    tally, lock = Tally(), threading.Lock()
    end_at = time.perf_counter() + seconds

    def work(number: int) -> None:
        client, mine = Client(port, token), Tally()
        sequence = 0
        while time.perf_counter() < end_at:
            method, path, body, expected = make_request(number, sequence)
            started = time.perf_counter()
            try:
                status, content = client.request(method, path, body)
            except (OSError, http.client.HTTPException) as error:
                status, content = 0, str(error).encode()
                client.close()
                client = Client(port, token)
            mine.latencies.append(time.perf_counter() - started)
            mine.requests += 1
            if status in expected:
                mine.successes[number] = mine.successes.get(number, 0) + 1
            else:
                mine.errors += 1
                if len(mine.error_samples) < 3:
                    mine.error_samples.append(f"{method} {path}: {status} {content[:200]!r}")
            sequence += 1
        client.close()
        with lock:
            tally.requests += mine.requests
            tally.errors += mine.errors
            tally.latencies += mine.latencies
            tally.error_samples += mine.error_samples[: 3 - len(tally.error_samples)]
            tally.successes.update(mine.successes)

    threads = [threading.Thread(target=work, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


@contextmanager
def api_server(bench) -> Iterator[tuple[Server, str]]:
    """A daphne child and a write token for every domain; the domain exists."""
    bench.env.run("manage.py", "createdomain", DOMAIN)
    token = bench.env.run("manage.py", "createtoken", "--scope", "write", "--name", "bench").stdout.split()[
        -1
    ]
    with bench._running(start_web(bench.env, "daphne")) as server:
        yield server, token


# wrk (Debian's package): a load generator in C, so that the GET rate is the server's, not
# that of a Python client taking a share of the same two cores.
WRK = "wrk"
WRK_SCRIPT = """\
local paths = {%(paths)s}
local n = 0
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n %% #paths) + 1])
end
"""


def wrk_missing() -> str:
    return "" if shutil.which(WRK) else "wrk is not installed (make system-deps installs Debian's)"


@dataclass(frozen=True)
class WrkReport:
    requests: int
    errors: int  # answers other than 2xx/3xx, and socket errors
    p50_seconds: float
    p99_seconds: float
    error_samples: list[str]


def run_wrk(
    port: int, token: str, paths: list[str], connections: int, seconds: float, script: Path
) -> WrkReport:
    """``connections`` keep-alive connections of one wrk thread GETting ``paths`` in turn."""
    quoted = ", ".join(json.dumps(f"/api/v1/{path}") for path in paths)
    script.write_text(WRK_SCRIPT % {"paths": quoted, "token": token})
    duration = max(1, round(seconds))
    command = [WRK, "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--latency", "-s", str(script)]
    result = subprocess.run(
        [*command, f"http://{HOST}:{port}"], capture_output=True, text=True, timeout=duration + 60
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited {result.returncode}: {result.stderr[-500:]}")
    return parse_wrk(result.stdout)


def parse_wrk(report: str) -> WrkReport:
    requests = int(re.search(r"^\s*(\d+) requests in", report, re.M).group(1))
    not_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    failed = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report)
    errors = (int(not_ok.group(1)) if not_ok else 0) + (sum(map(int, failed.groups())) if failed else 0)
    p50, p99 = (_seconds(re.search(rf"^\s*{p}%\s+(\S+)", report, re.M).group(1)) for p in (50, 99))
    return WrkReport(requests, errors, p50, p99, [] if errors == 0 else [report[-500:]])


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def figures(tally: Tally, seconds: float, cpu, percentile, ms, ratio) -> dict:
    return {
        "requests": tally.requests,
        "req_per_s": ratio(tally.requests, seconds),
        "p50_ms": ms(percentile(tally.latencies, 50)),
        "p99_ms": ms(percentile(tally.latencies, 99)),
        **cpu.figures(),
        "cpu_ms_per_request": ratio(cpu.total * 1000, tally.requests),
        "seconds": seconds,
        "errors": tally.errors,
        "error_samples": tally.error_samples,
        "successes_by_client": tally.successes,
    }
