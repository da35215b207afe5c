"""The figures against Dovecot 2.3.19 and the issue's targets: a table on stdout, JSON on disk."""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Dovecot's figures are issue 5's, except in rows with a ``reference``: those are measured in
# the same run (bench.dovecot), with targets from issue 14 as ratios.
# What a row's verdict means: "target" is a goal stated by issue 5 or 14; "ref" compares with
# Dovecot's figure only; "info" is shown for context with nothing to meet.
TARGET, REFERENCE, INFO = "target", "ref", "info"


@dataclass(frozen=True)
class Check:
    scenario: str
    figure: str
    label: str
    unit: str
    dovecot: float | None
    target: float | None = None
    at_least: bool = True  # met when value >= target; otherwise when value <= target
    kind: str = TARGET
    scale: float = 1.0  # figure * scale = the value in ``unit``
    note: str = ""
    # A scenario measuring Dovecot in the same run: its figure replaces ``dovecot``, and the
    # target is then a ratio of ours to it.
    reference: str = ""


CHECKS = (
    Check("retr_plain", "msg_per_s", "RETR 4 clients, plain, cache on", "msg/s", 2900, 2900),
    Check("retr_plain", "mb_per_s", "", "MB/s", 200, 200),
    Check("retr_plain", "cpu_ms_per_mb", "", "ms CPU/MB", 5, 5, at_least=False, kind=REFERENCE),
    Check("retr_tls", "msg_per_s", "RETR 4 clients, implicit TLS, cache on", "msg/s", 1800, 1800),
    Check("retr_tls", "mb_per_s", "", "MB/s", 125, 125),
    Check("retr_tls", "cpu_ms_per_mb", "", "ms CPU/MB", None, kind=INFO),
    Check("retr_cold", "msg_per_s", "RETR 4 clients, argon2 every login", "msg/s", 340, 340, kind=REFERENCE),
    Check("retr_cold", "mb_per_s", "", "MB/s", None, kind=INFO),
    Check(
        "logins_cold",
        "logins_per_s",
        "logins, argon2, cache off; Dovecot with the same hashes",
        "logins/s",
        None,
        1.2,
        reference="dovecot_logins_cold",
    ),
    Check("logins_cold", "p99_ms", "", "ms p99", None, 1.0, at_least=False, reference="dovecot_logins_cold"),
    Check("logins_cold", "p50_ms", "", "ms p50", None, kind=INFO, reference="dovecot_logins_cold"),
    Check(
        "logins_cold",
        "cpu_ms_per_login",
        "",
        "ms CPU/login",
        None,
        kind=INFO,
        reference="dovecot_logins_cold",
    ),
    Check(
        "logins_warm",
        "logins_per_s",
        "logins, cache warm; Dovecot with {PLAIN}",
        "logins/s",
        None,
        1.0,
        reference="dovecot_logins_warm",
    ),
    Check("logins_warm", "p99_ms", "", "ms p99", None, kind=INFO, reference="dovecot_logins_warm"),
    Check(
        "logins_warm",
        "cpu_ms_per_login",
        "",
        "ms CPU/login",
        None,
        kind=INFO,
        reference="dovecot_logins_warm",
    ),
    Check(
        "idle_plain",
        "pss_kib_per_session",
        "idle sessions, plain",
        "KiB PSS/session",
        650,
        64,
        at_least=False,
    ),
    Check(
        "idle_tls", "pss_kib_per_session", "idle sessions, TLS", "KiB PSS/session", 1900, 320, at_least=False
    ),
    Check("held_sessions", "held", "concurrent plain connections", "held", None, 10000),
    Check("held_sessions", "login_while_held_ms", "", "ms login meanwhile", None, kind=INFO),
    Check(
        "large_mailbox",
        "login_to_stat_s",
        "large mailbox (100,000 in full)",
        "s PASS..STAT",
        0.25,
        0.25,
        at_least=False,
    ),
    Check("large_mailbox", "first_login_to_stat_s", "", "s PASS..STAT, read", None, kind=INFO),
    Check("large_mailbox", "list_s", "", "s LIST", 0.02, 0.02, at_least=False),
    Check("large_mailbox", "first_list_s", "", "s LIST, made", None, kind=INFO),
    Check("large_mailbox", "uidl_s", "", "s UIDL", 0.13, 0.13, at_least=False),
    Check(
        "large_mailbox", "retr_last_s", "", "ms RETR last", 1, 1, at_least=False, kind=REFERENCE, scale=1000
    ),
    Check(
        "pipelined",
        "seconds",
        "1,000 pipelined LIST n/UIDL n",
        "ms",
        None,
        1.5,
        at_least=False,
        scale=1000,
        reference="dovecot_pipelined",
    ),
    Check(
        "pipelined",
        "cpu_ms_per_round",
        "",
        "ms CPU/round",
        None,
        kind=INFO,
        reference="dovecot_pipelined",
    ),
    Check("lmtp", "msg_per_s", "LMTP 4 connections, small", "msg/s", 950, 950),
    Check("lmtp", "p99_ms", "", "ms p99", None, kind=INFO),
    Check("api_put", "req_per_s", "API PUT mailbox, pre-hashed password", "req/s", None, 200),
    Check("api_put", "p99_ms", "", "ms p99", None, kind=INFO),
    Check("api_get", "req_per_s", "API GET mailbox", "req/s", None, 1000),
    Check("api_get", "cpu_ms_per_request", "", "ms CPU/request", None, kind=INFO),
    Check(
        "api_import",
        "seconds",
        "API import of 10,000 pre-hashed mailboxes, one call",
        "s",
        None,
        30,
        at_least=False,
    ),
    Check("api_token_check", "cpu_ms_per_check", "API token check", "ms CPU/check", None, 1, at_least=False),
    Check(
        "console_dashboard",
        "dashboard_superuser_ms",
        "console, 100,000 mailboxes, 1,000,000 sessions",
        "ms dashboard",
        None,
        300,
        at_least=False,
    ),  # fmt: skip
    Check(
        "console_dashboard",
        "dashboard_domain_admin_ms",
        "",
        "ms dashboard, domain admin",
        None,
        300,
        at_least=False,
    ),  # fmt: skip
    Check("console_dashboard", "charts_superuser_ms", "", "ms charts", None, kind=INFO),
    Check(
        "console_prune",
        "longest_write_stall_ms",
        "prunehistory of all history (1,000,000 sessions seeded) beside a writer",
        "ms longest write",
        None,
        100,
        at_least=False,
    ),  # fmt: skip
    Check(
        "console_prune", "control_longest_write_stall_ms", "", "ms longest write, no prune", None, kind=INFO
    ),
    Check("console_prune", "rows_removed", "", "rows pruned", None, kind=INFO),
    Check("console_prune", "rows_per_s", "", "rows/s pruned", None, kind=INFO),
    Check(
        "lmtp", "msg_per_s", "LMTP, ratio to Dovecot this run", "msg/s", None, 1.5, reference="dovecot_lmtp"
    ),
    Check(
        "fleet_plain",
        "msg_per_s",
        "fleet RETR, plain, as shipped",
        "msg/s",
        None,
        1.0,
        reference="dovecot_fleet_plain",
    ),
    Check("fleet_plain", "mb_per_s", "", "MB/s", None, 1.0, reference="dovecot_fleet_plain"),
    Check(
        "fleet_plain",
        "cpu_ms_per_mb",
        "",
        "ms CPU/MB",
        None,
        1.0,
        at_least=False,
        reference="dovecot_fleet_plain",
    ),
    Check(
        "fleet_plain",
        "retr_p50_ms",
        "",
        "ms RETR p50",
        None,
        at_least=False,
        kind=INFO,
        reference="dovecot_fleet_plain",
    ),
    Check(
        "fleet_plain",
        "retr_p99_ms",
        "",
        "ms RETR p99",
        None,
        at_least=False,
        kind=INFO,
        reference="dovecot_fleet_plain",
    ),
    Check(
        "fleet_tls",
        "msg_per_s",
        "fleet RETR, TLS, as shipped",
        "msg/s",
        None,
        1.0,
        reference="dovecot_fleet_tls",
    ),
    Check("fleet_tls", "mb_per_s", "", "MB/s", None, 1.0, reference="dovecot_fleet_tls"),
    Check(
        "fleet_tls",
        "cpu_ms_per_mb",
        "",
        "ms CPU/MB",
        None,
        1.0,
        at_least=False,
        reference="dovecot_fleet_tls",
    ),
    Check(
        "fleet_tls",
        "retr_p50_ms",
        "",
        "ms RETR p50",
        None,
        at_least=False,
        kind=INFO,
        reference="dovecot_fleet_tls",
    ),
    Check(
        "fleet_tls",
        "retr_p99_ms",
        "",
        "ms RETR p99",
        None,
        at_least=False,
        kind=INFO,
        reference="dovecot_fleet_tls",
    ),
    Check(
        "deliver_pipe",
        "fast_median_ms",
        "pipe delivery through runlmtp",
        "ms/message",
        None,
        50,
        at_least=False,
    ),
    Check("deliver_pipe", "in_process_median_ms", "", "ms in-process", None, kind=INFO),
    Check("deliver_pipe", "fast_cpu_median_ms", "", "ms CPU/message", None, kind=INFO),
    Check("deliver_pipe", "in_process_cpu_median_ms", "", "ms CPU in-process", None, kind=INFO),
    Check(
        "live_page",
        "p95_ms",
        "login to live page, 1,000 sessions churning",
        "ms p95",
        None,
        2000,
        at_least=False,
    ),
    Check("live_page", "churn_logins_per_s", "", "logins/s churn", None, kind=INFO),
    Check(
        "memory_25mb",
        "peak_growth_mib",
        "10 concurrent RETR of the big message",
        "MiB peak RSS",
        None,
        64,
        at_least=False,
    ),
)


def _value(results: dict[str, dict], check: Check) -> float | None:
    value = results.get(check.scenario, {}).get(check.figure)
    if value is None or check.scale == 1:
        return value
    return value * check.scale


def verdict(check: Check, value: float | None, smoke: bool) -> str:
    if check.kind == INFO or check.target is None:
        return ""
    if smoke:
        return "(smoke)"
    if value is None:
        return "no figure"
    met = value >= check.target if check.at_least else value <= check.target
    return "met" if met else "NOT met"


def _all_checks() -> tuple[Check, ...]:
    from bench import console_pages  # imports Check from here

    return CHECKS + console_pages.CHECKS


def evaluate(results: dict[str, dict], smoke: bool) -> list[dict]:
    """One entry per check: the value next to Dovecot's and the target, and the verdict.

    A check with a ``reference`` takes Dovecot's figure from that scenario of the same run, and
    its verdict from the ratio of ours to it.
    """
    entries = []
    for check in _all_checks():
        if check.scenario not in results:
            continue
        value = _value(results, check)
        entry = {**asdict(check), "value": value, "verdict": verdict(check, value, smoke)}
        if check.reference:
            dovecot = _value(results, replace(check, scenario=check.reference))
            share = round(value / dovecot, 3) if value is not None and dovecot else None
            entry.update(dovecot=dovecot, ratio=share, verdict=verdict(check, share, smoke))
            if dovecot is None and check.kind != INFO and not smoke:
                entry["verdict"] = "no Dovecot figure"
        entries.append(entry)
    return entries


def number(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def target_text(check: dict) -> str:
    if check["target"] is None:
        return ""
    ratio = "x Dovecot" if check["reference"] else ""
    return f"{'≥' if check['at_least'] else '≤'} {number(check['target'])}{ratio}"


def measured_text(entry: dict) -> str:
    if entry.get("ratio") is None:
        return number(entry["value"])
    return f"{number(entry['value'])} ({entry['ratio']:.2f}x)"


def table(entries: list[dict], results: dict[str, dict]) -> str:
    """A Markdown table (readable on a terminal and pasteable into docs/benchmarks.md)."""
    rows = [("scenario", "measured (ratio)", "unit", "Dovecot 2.3.19", "target", "kind", "verdict")]
    for entry in entries:
        error = "error" in results.get(entry["scenario"], {})
        label = entry["label"]
        rows.append(
            (
                f"{label} ({entry['scenario']})" if label else "",
                "ERROR" if error else measured_text(entry),
                entry["unit"],
                number(entry["dovecot"]),
                target_text(entry),
                entry["kind"],
                "scenario failed" if error else entry["verdict"],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * width for width in widths) + " |")
    notes = [f"{entry['scenario']} {entry['unit']}: {entry['note']}" for entry in entries if entry["note"]]
    return "\n".join(lines + [""] + notes if notes else lines)


def problems(payload: dict) -> list[str]:
    """Scenario failures and anything the servers logged at ERROR, or a non-zero exit."""
    found = [
        f"{name}: {figures['error']}" for name, figures in payload["results"].items() if "error" in figures
    ]
    for name, server in payload["servers"].items():
        if server["exit_code"] != 0 or not server["alive_at_end"]:
            found.append(f"{name}: alive at end {server['alive_at_end']}, exit code {server['exit_code']}")
        found += [f"{name}: {line}" for line in server["problems"]]
    for name, figures in payload["results"].items():
        if figures.get("errors"):
            found.append(f"{name}: {figures['errors']} client errors, e.g. {figures.get('error_samples')}")
    return found


def write(payload: dict, directory: Path, stamp: str, label: str) -> list[Path]:
    text = json.dumps(payload, indent=2, sort_keys=False)
    paths = [directory / f"{stamp}-{label}.json", directory / f"latest-{label}.json"]
    for path in paths:
        path.write_text(text + "\n")
    return paths
