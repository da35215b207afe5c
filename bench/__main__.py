"""``python -m bench [--smoke] [--seconds N] ...``: build a corpus, run the scenarios, report.

SQLite by default (a fresh file under the run's directory); with DATABASE_URL set to a
PostgreSQL URL, a dedicated ``<name>_bench`` database on that server, dropped at the end.
"""

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import corpus, report
from bench.load import Workers
from bench.scenarios import SCENARIOS, Bench, Options, run_all
from bench.servers import PROJECT_DIR, Database, Environment, make_certificate

# File descriptors kept back from the held-sessions scenario for everything else.
FD_RESERVE = 2500


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every scenario for ~1 s on tiny corpora")
    parser.add_argument("--seconds", type=float, help="length of each timed scenario (default 10; smoke 1)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients/connections (default 4)")
    parser.add_argument("--idle-sessions", type=int, help="idle sessions, plain and TLS each (500; smoke 10)")
    parser.add_argument("--held-sessions", type=int, help="concurrent plain connections (10000; smoke 50)")
    parser.add_argument(
        "--large-mailbox", type=int, help="messages in the large mailbox (100000; smoke 1000)"
    )
    parser.add_argument(
        "--skip-large", action="store_true", help="no large mailbox (and no large-mailbox row)"
    )
    parser.add_argument(
        "--fleet-mailboxes", type=int, help="mailboxes of the fleet compared with Dovecot (500; smoke 4)"
    )
    parser.add_argument("--pipelined", type=int, default=1000, help="commands in the pipelining row")
    parser.add_argument("--repeats", type=int, default=5, help="sessions/rounds behind the median rows")
    parser.add_argument("--import-rows", type=int, help="mailboxes in the API import (10000; smoke 100)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    parser.add_argument("--output-dir", type=Path, default=PROJECT_DIR / "var" / "bench")
    parser.add_argument("--keep-db", action="store_true", help="keep the bench database afterwards")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def raise_fd_limit() -> int:
    """Hold many sockets here and in the servers (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        soft = hard if hard != resource.RLIM_INFINITY else 1_048_576
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def plan(args: argparse.Namespace, fd_limit: int) -> tuple[corpus.CorpusSpec, Options]:
    spec = corpus.CorpusSpec.smoke() if args.smoke else corpus.CorpusSpec()
    idle = args.idle_sessions if args.idle_sessions is not None else (10 if args.smoke else 500)
    held = args.held_sessions if args.held_sessions is not None else (50 if args.smoke else 10_000)
    large = 0 if args.skip_large else args.large_mailbox
    spec = dataclasses.replace(
        spec,
        fleet_users=spec.fleet_users if args.fleet_mailboxes is None else args.fleet_mailboxes,
        idle_users=2 * idle,
        large_mailbox_messages=spec.large_mailbox_messages if large is None else large,
    )
    options = Options(
        seconds=args.seconds or (1.0 if args.smoke else 10.0),
        clients=args.clients,
        idle_sessions=idle,
        held_sessions=max(0, min(held, fd_limit - 2 * idle - FD_RESERVE)),
        pipelined=args.pipelined,
        repeats=args.repeats,
        pipe_deliveries=4 if args.smoke else 20,
        only=frozenset(filter(None, args.only.split(","))),
        smoke=args.smoke,
        import_rows=args.import_rows or (100 if args.smoke else 10_000),
        token_checks=100 if args.smoke else 2000,
    )
    return spec, options


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), ""
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_kib": int(meminfo[0].split()[1]),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=PROJECT_DIR, capture_output=True, text=True
        )
    except OSError:
        return ""
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def build_corpus(env: Environment, spec: corpus.CorpusSpec, directory: Path) -> dict:
    spec_path, manifest_path = directory / "corpus-spec.json", directory / "corpus-manifest.json"
    corpus.write_spec(spec, spec_path)
    env.run("-m", "bench.corpus", str(spec_path), str(manifest_path))
    return json.loads(manifest_path.read_text())


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    fd_limit = raise_fd_limit()
    spec, options = plan(args, fd_limit)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    configured_url = os.environ.get("DATABASE_URL", "")
    label = ("postgresql" if configured_url else "sqlite") + ("-smoke" if args.smoke else "")
    run_dir = args.output_dir / f"{stamp}-{label}"
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *argv]),
        "commit": git_commit(),
        "machine": machine(),
        "load_average_start": load_average(),
        "fd_limit": fd_limit,
        "smoke": args.smoke,
        "options": {**dataclasses.asdict(options), "only": sorted(options.only)},
        "corpus": dataclasses.asdict(spec),
        "run_dir": str(run_dir),
    }
    database = Database.create(configured_url, run_dir)
    meta["database"] = database.label
    try:
        env = Environment(database.url, run_dir)
        print(f"bench: {database.label} database, migrating and building the corpus ...", flush=True)
        env.run("manage.py", "migrate", "--noinput")
        meta["corpus_manifest"] = build_corpus(env, spec, run_dir)
        meta["database_bytes"] = database.size_bytes()
        bench = Bench(env, spec, options, make_certificate(run_dir), Workers(options.clients))
        try:
            results = run_all(bench)
        finally:
            bench.workers.close()
    finally:
        if not args.keep_db:
            database.drop()
    meta["load_average_end"] = load_average()
    meta["total_seconds"] = round(time.perf_counter() - started, 1)
    payload = {"meta": meta, "results": results, "servers": bench.servers}
    payload["checks"] = report.evaluate(results, args.smoke)
    payload["problems"] = report.problems(payload)
    print()
    print(report.table(payload["checks"], results))
    for path in report.write(payload, args.output_dir, stamp, label):
        print(f"wrote {path}")
    if payload["problems"]:
        print("\nproblems:\n" + "\n".join(payload["problems"]), file=sys.stderr)
    print(f"bench finished in {meta['total_seconds']} s (load average {meta['load_average_end']})")
    return 1 if payload["problems"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
