"""`make run`'s commands and a newcomer's first hour: setupdemo keeps the credentials, runall
starts every listener and prints where to go only once all of them answer; a listener that
cannot start is named; a listing piped into `head` ends quietly."""

import json
import poplib
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from mailadmin.hosting import store
from mailadmin.hosting.store import iter_message_bytes
from mailadmin.models import Mailbox, Message, Pop3Session
from tests.conftest import PROJECT_DIR, child_environment, run_manage
from tests.daemons import HOST, DaemonProcess, free_port, start_daemon
from tests.pop3_server import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


class RunAll(DaemonProcess):
    command = "runall"


def environment(var: Path, **ports: int) -> dict[str, str]:
    return {"MAILADMIN_VAR_DIR": str(var), "POP3S_PORT": "0", **{k: str(v) for k, v in ports.items()}}


def test_demo_banner_comes_once_every_listener_answers_and_its_credentials_work(tmp_path):
    var = tmp_path / "var"
    http_port, pop3_port, lmtp_port = free_port(), free_port(), free_port()
    env = environment(var, POP3_PORT=pop3_port, LMTP_PORT=lmtp_port)
    prepared = run_manage("setupdemo", **env)
    assert prepared.returncode == 0, prepared.stderr
    credentials_file = var / "demo-credentials.json"
    assert prepared.stdout.decode().strip() == f"Demo data ready; its credentials are in {credentials_file}."
    credentials = json.loads(credentials_file.read_text())
    server = start_daemon(
        RunAll,
        ["--demo", "--http-port", str(http_port)],
        stderr_path=tmp_path / "runall.stderr",
        environment=env,
        ready=["Kept in:", "  LMTP:"],
    )
    try:
        banner = "\n".join(server.stdout_lines)
        assert f"  Web admin:  http://127.0.0.1:{http_port}/admin/" in banner
        assert f"              user admin, password {credentials['admin']}" in banner
        assert f"  Mailbox:    demo@example.test, password {credentials['mailbox']}" in banner
        assert f"  Kept in:    {credentials_file}" in banner
        assert f"  POP3:       127.0.0.1:{pop3_port}" in banner
        assert f"  LMTP:       127.0.0.1:{lmtp_port}" in banner
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/admin/login/") as page:
            assert page.status == 200
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/static/admin/css/base.css") as asset:
            assert asset.status == 200
        client = poplib.POP3(HOST, pop3_port, timeout=30)
        client.user("demo@example.test")
        client.pass_(credentials["mailbox"])
        assert client.stat()[0] == 3  # the demo messages
        client.quit()
        # Ours is the only POP3 session: finding the listeners up opened none.
        wait_for(lambda: Pop3Session.objects.filter(ended_at__isnull=False).exists())
        assert list(Pop3Session.objects.values_list("username", "end_reason")) == [
            ("demo@example.test", "quit")
        ]
        assert server.terminate() == 0
        assert not [line for line in server.stdout_lines if "/static/" in line]
        assert [line for line in server.stdout_lines if '"GET /admin/login/' in line] != []
    finally:
        if server.process.poll() is None:
            server.kill()


def test_a_listener_that_cannot_start_is_named_and_stops_the_others(tmp_path):
    var = tmp_path / "var"
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        env = environment(var, POP3_PORT=taken.getsockname()[1], LMTP_PORT=free_port())
        result = run_manage("runall", "--http-port", str(free_port()), **env)
    assert result.returncode == 1
    assert "runpop3 stopped with exit status 1; the other listeners were stopped." in result.stderr.decode()


def test_listeners_do_not_outlive_a_killed_runall(tmp_path):
    env = environment(tmp_path / "var", POP3_PORT=free_port(), LMTP_PORT=free_port())
    server = start_daemon(
        RunAll,
        ["--http-port", str(free_port())],
        stderr_path=tmp_path / "e",
        environment=env,
        ready=["Listening:"],
    )
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    assert len(children) == 3
    server.kill()
    wait_for(lambda: not any(running(pid) for pid in children))


def running(pid: str) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_demo_messages_have_a_date_and_a_message_id(tmp_path):
    prepared = run_manage("setupdemo", MAILADMIN_VAR_DIR=str(tmp_path))
    assert prepared.returncode == 0, prepared.stderr
    heads = [
        b"".join(iter_message_bytes(pk)).split(b"\r\n\r\n")[0]
        for pk in Message.objects.values_list("pk", flat=True)
    ]
    assert len(heads) == 3
    assert all(re.search(rb"\r\nDate: \w{3}, \d", head) and b"\r\nMessage-ID: <" in head for head in heads)


def test_a_reader_that_goes_away_ends_a_listing_quietly(tmp_path):
    """Several pipe buffers of listing, so the writer is still writing when `head` has gone."""
    domain = store.create_domain("pipe.test")
    users = get_user_model().objects.bulk_create(
        get_user_model()(username=f"user{number:05}@pipe.test", password="!") for number in range(4000)
    )
    Mailbox.objects.bulk_create(Mailbox(user=user, domain=domain) for user in users)
    reader = subprocess.Popen(
        f"{sys.executable} manage.py listmailboxes | head -c 1",
        shell=True,
        cwd=PROJECT_DIR,
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = reader.communicate(timeout=60)
    assert (len(out), err) == (1, b"")
