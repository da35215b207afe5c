"""The README's provisioning walkthrough, run as written: its shell block with real ``curl``
against ``runweb`` (two daphne workers on one port) serving the test database."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mailadmin.models import AuditEntry, Mailbox
from tests.conftest import PROJECT_DIR, child_environment, open_session_row
from tests.daemons import HOST, STARTUP_TIMEOUT, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

KICK_STEP = "# Kick its POP3 sessions"


def walkthrough() -> tuple[str, str]:
    """The README's walkthrough block, split before the kick (the test opens a session there)."""
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme[readme.index("### Provisioning walkthrough") :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL).group(1)
    before, after = block.split(KICK_STEP)
    return before, KICK_STEP + after


@contextmanager
def web_server(stderr_path: Path) -> Iterator[int]:
    port = free_port()
    command = [sys.executable, "manage.py", "runweb", "--bind", HOST, "--port", str(port), "--workers", "2"]
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=PROJECT_DIR, env=child_environment(), stderr=stderr)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _accepting(port):
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "runweb did not start listening"
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def _accepting(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def run_shell(script: str, tmp_path: Path, **variables: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    environment = child_environment(PATH=f"{bin_dir}:{os.environ['PATH']}", **variables)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def answer(line: str) -> tuple[dict, int]:
    """A curl line as the walkthrough prints it: the JSON body, a space, the status."""
    body, _, status = line.rpartition(" ")
    return json.loads(body), int(status)


def test_the_readme_walkthrough_runs_against_runweb(tmp_path):
    before_kick, from_kick = walkthrough()
    with web_server(tmp_path / "runweb.stderr") as port:
        api = f"http://{HOST}:{port}/api/v1"
        lines = run_shell(before_kick + 'echo "TOKEN=$TOKEN"', tmp_path, API=api)
        token = lines.pop().removeprefix("TOKEN=")
        created, quota_set, usage = (answer(line) for line in lines if line.startswith("{"))
        carol = Mailbox.objects.get(user__username="carol@example.test")
        open_session_row(carol)
        kicked, audit_page = (
            answer(line)
            for line in run_shell(from_kick, tmp_path, API=api, AUTH=f"Authorization: Bearer {token}")
        )
    assert created[1] == 201 and created[0]["address"] == "carol@example.test"
    assert quota_set[1] == 200 and (quota_set[0]["quota_bytes"], quota_set[0]["quota_messages"]) == (
        2**31,
        50000,
    )
    assert usage == (
        {**quota_set[0], "used_bytes": 0, "used_messages": 0, "last_login": None},
        200,
    )
    assert kicked == ({"kicked": 1}, 200)
    entries = audit_page[0]["results"]
    assert [(entry["action"], entry["object_type"]) for entry in entries] == [
        ("create", "domain"),
        ("create", "api token"),
        ("create", "mailbox"),
        ("update", "mailbox"),
        ("kick", "pop3 session"),
    ]
    by_token = AuditEntry.objects.filter(actor_kind="token")
    assert set(by_token.values_list("client_address", flat=True)) == {HOST}
    assert Mailbox.objects.get(pk=carol.pk).quota_bytes == 2**31
