"""``python -m bench --smoke`` runs every scenario and writes its JSON (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from bench.dovecot import missing
from bench.scenarios import SCENARIOS
from tests.conftest import PROJECT_DIR

SMOKE_TIMEOUT_SECONDS = 900  # a guard against a hang: the run takes about a minute


@pytest.mark.slow
def test_bench_smoke_runs_every_scenario(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--output-dir", str(tmp_path)],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [latest] = tmp_path.glob("latest-*-smoke.json")
    payload = json.loads(latest.read_text())
    assert set(payload) == {"meta", "results", "servers", "checks", "problems"}
    assert set(payload["results"]) == set(SCENARIOS)
    assert payload["problems"] == []
    assert all("error" not in figures for figures in payload["results"].values())
    results = payload["results"]
    assert results["retr_plain"]["messages"] > 0
    assert results["lmtp"]["delivered"] > 0
    # The fleet's clients check every message's bytes: any mismatch is a client error, a problem.
    assert results["fleet_plain"]["messages"] > 0
    assert results["fleet_tls"]["messages"] > 0
    dovecot = [
        "dovecot_fleet_plain",
        "dovecot_fleet_tls",
        "dovecot_lmtp",
        "dovecot_logins_cold",
        "dovecot_logins_warm",
        "dovecot_pipelined",
    ]
    if missing():
        assert {name: results[name].get("skipped") for name in dovecot} == dict.fromkeys(dovecot, missing())
    else:
        assert results["dovecot_fleet_plain"]["messages"] > 0
        assert results["dovecot_fleet_tls"]["messages"] > 0
        assert results["dovecot_lmtp"]["delivered"] > 0
        # A cold login is an argon2 check (0.2 s and more): a smoke window may end before one does.
        assert results["dovecot_logins_cold"]["errors"] == 0
        assert results["dovecot_logins_warm"]["logins"] > 0
        assert results["dovecot_pipelined"]["commands"] == results["pipelined"]["commands"]
        # CPU is read in clock ticks of 10 ms, and a smoke window's few rounds may cost Dovecot
        # none: only the figures that count work or time are held to a ratio here.
        ratios = {
            (entry["scenario"], entry["figure"]): entry["ratio"]
            for entry in payload["checks"]
            if entry["scenario"] in {"fleet_plain", "logins_warm", "pipelined"}
            and not entry["figure"].startswith("cpu_")
        }
        assert all(ratio is not None and ratio > 0 for ratio in ratios.values()), ratios
    # Each delivery took the path it was meant to (the scenario fails otherwise).
    assert (results["deliver_pipe"]["fast_deliveries"], results["deliver_pipe"]["in_process_deliveries"]) == (
        4,
        1,
    )
