"""``python -m bench --smoke`` runs every scenario and writes its JSON (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from bench.scenarios import SCENARIOS
from tests.conftest import PROJECT_DIR

SMOKE_TIMEOUT_SECONDS = 300


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
    assert payload["results"]["retr_plain"]["messages"] > 0
    assert payload["results"]["lmtp"]["delivered"] > 0
