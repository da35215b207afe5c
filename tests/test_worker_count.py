"""``POP3_WORKERS``/``LMTP_WORKERS`` and ``--workers``: a number or ``auto`` (one per usable CPU)."""

import argparse
import os
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from mailadmin.prefork import worker_count_argument
from mailadmin.workercount import parse_worker_count, usable_cpus
from tests.conftest import PROJECT_DIR, child_environment
from tests.lmtp_server import running_lmtp
from tests.pop3_server import running_pop3, wait_for


def test_auto_is_the_number_of_cpus_this_process_may_use() -> None:
    assert usable_cpus() == len(os.sched_getaffinity(0))
    assert parse_worker_count("auto") == usable_cpus()
    assert parse_worker_count(" AUTO ") == usable_cpus()
    assert parse_worker_count("3") == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "", "1.5"])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_worker_count(value)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number of at least 1 or 'auto'"):
        worker_count_argument(value)


def test_auto_follows_the_affinity_mask_taskset_and_containers_narrow() -> None:
    first_cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{first_cpu}}}); "
        "from mailadmin.workercount import parse_worker_count; print(parse_worker_count('auto'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_DIR)
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr


def settings_in_child(**environment: str) -> subprocess.CompletedProcess:
    code = "from django.conf import settings; print(settings.POP3_WORKERS, settings.LMTP_WORKERS)"
    env = {key: value for key, value in child_environment(**environment).items() if value != "<unset>"}
    return subprocess.run(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", code],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        env=env,
    )


@pytest.mark.django_db
def test_both_default_to_auto_and_take_a_number() -> None:
    default = settings_in_child(POP3_WORKERS="<unset>", LMTP_WORKERS="<unset>")
    assert default.stdout == f"{usable_cpus()} {usable_cpus()}\n", default.stderr
    assert settings_in_child(POP3_WORKERS="3", LMTP_WORKERS="auto").stdout == f"3 {usable_cpus()}\n"
    refused = settings_in_child(POP3_WORKERS="0")
    assert refused.returncode == 1
    assert "POP3_WORKERS must be 'auto' or a number of at least 1" in refused.stderr


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_runlmtp_with_auto_forks_one_worker_per_cpu_and_delivers(tmp_path: Path, make_mailbox) -> None:
    address = make_mailbox("auto@example.test").address
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="auto") as server:
        assert len(server.workers()) == (usable_cpus() if usable_cpus() > 1 else 0)
        with server.smtplib_client() as lmtp:
            assert lmtp.sendmail("s@remote.test", [address], b"Subject: auto\r\n\r\nx\r\n") == {}


def refused(port: int, address: str) -> bool:
    """Nothing listens on ``port`` any more: a connection is refused, not answered or reset."""
    try:
        smtplib.LMTP("127.0.0.1", port, local_hostname="client.test", timeout=5).sendmail(
            "s@remote.test", [address], b"x\r\n"
        )
    except ConnectionRefusedError:
        return True
    except (ConnectionResetError, smtplib.SMTPServerDisconnected):
        return False
    return False


def running(pid: int) -> bool:
    """Neither gone nor a zombie waiting to be reaped (by whatever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_workers_die_with_a_supervisor_killed_by_sigkill(tmp_path: Path, make_mailbox) -> None:
    """None is left holding the listener (and, for runpop3, sessions and their leases)."""
    address = make_mailbox("orphan@example.test").address
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="2") as server:
        workers = server.workers()
        assert len(workers) == 2
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=30) == -signal.SIGKILL
        assert wait_for(lambda: not any(map(running, workers)), timeout=10)
        # The last worker's listener closes as it exits: a connection queued just then is reset.
        assert wait_for(lambda: refused(server.port, address), timeout=10)


DAEMONS = {"runlmtp": (running_lmtp, "LMTP_WORKERS"), "runpop3": (running_pop3, "POP3_WORKERS")}


def cpus_of_threads(pid: int) -> list[frozenset[int]]:
    """The CPUs each thread of process ``pid`` may run on."""
    return [frozenset(os.sched_getaffinity(int(task.name))) for task in Path(f"/proc/{pid}/task").iterdir()]


def use_some_threads(daemon: str, server, address: str) -> None:
    """A few units of database work, so that the workers have started their threads."""
    for _ in range(4):
        if daemon == "runlmtp":
            with server.smtplib_client() as lmtp:
                assert lmtp.sendmail("s@remote.test", [address], b"Subject: x\r\n\r\nx\r\n") == {}
        else:
            with server.connect() as client:
                client.command("USER " + address)
                assert client.command("PASS correct horse").startswith(b"+OK")
                client.command("QUIT")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["runlmtp", "runpop3"])
@pytest.mark.parametrize("pin", ["on", "off"])
def test_each_worker_and_its_threads_keep_to_a_cpu_of_their_own(tmp_path: Path, make_mailbox, daemon, pin):
    address = make_mailbox("pinned@example.test").address
    cpus = sorted(os.sched_getaffinity(0))
    running, workers = (
        (running_lmtp, "LMTP_WORKERS") if daemon == "runlmtp" else (running_pop3, "POP3_WORKERS")
    )
    with running(tmp_path / daemon, **{workers: "2", "DAEMON_PIN_WORKERS": pin}) as server:
        use_some_threads(daemon, server, address)
        threads = [cpus_of_threads(pid) for pid in server.workers()]
        supervisor = cpus_of_threads(server.pid)
    assert all(len(each) > 1 for each in threads)  # the loop's and the database work's
    if pin == "on":  # worker i on the i-th CPU, round robin
        expected = sorted([{frozenset({cpus[0]})}, {frozenset({cpus[1 % len(cpus)]})}], key=min)
        assert sorted((set(each) for each in threads), key=min) == expected
    else:
        assert [set(each) for each in threads] == [{frozenset(cpus)}] * 2
    assert set(supervisor) == {frozenset(cpus)}  # the supervisor is not pinned
