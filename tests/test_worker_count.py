"""``POP3_WORKERS``/``LMTP_WORKERS`` and ``--workers``: a number or ``auto`` (one per usable CPU)."""

import argparse
import errno
import logging
import os
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailadmin import prefork
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


def cpus_of_threads(pid: int) -> set[tuple[int, ...]]:
    """The CPU sets the threads of process ``pid`` may run on."""
    return {
        tuple(sorted(os.sched_getaffinity(int(task.name)))) for task in Path(f"/proc/{pid}/task").iterdir()
    }


def policies_of_threads(pid: int) -> dict[int, int]:
    """The scheduling policy of each thread of process ``pid``, by thread id."""
    return {
        int(task.name): os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()
    }


def use_some_threads(daemon: str, server, address: str) -> None:
    """A few units of database work (and for runpop3 a password check), so that the workers
    have started their threads: for runlmtp, to an unknown address as well, which a database
    thread looks up even where the loop looks up mailboxes (PostgreSQL)."""
    for _ in range(4):
        if daemon == "runlmtp":
            with server.smtplib_client() as lmtp:
                recipients = [address, "nobody@example.test"]
                refused = lmtp.sendmail("s@remote.test", recipients, b"Subject: x\r\n\r\nx\r\n")
                assert list(refused) == ["nobody@example.test"]
        else:
            with server.connect() as client:
                client.command("USER " + address)
                assert client.command("PASS correct horse").startswith(b"+OK")
                client.command("QUIT")


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
@pytest.mark.parametrize("daemon", ["runlmtp", "runpop3"])
@pytest.mark.parametrize("pin", ["on", "off"])
def test_with_a_worker_per_cpu_each_keeps_to_its_own(tmp_path: Path, make_mailbox, daemon, pin):
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2:
        pytest.skip("on one CPU a pinned worker runs where an unpinned one would")
    address = make_mailbox("pinned@example.test").address
    running, workers = DAEMONS[daemon]
    with running(tmp_path / daemon, **{workers: "auto", "DAEMON_PIN_WORKERS": pin}) as server:
        use_some_threads(daemon, server, address)
        threads = [cpus_of_threads(pid) for pid in server.workers()]
        policies = {pid: policies_of_threads(pid) for pid in server.workers()}
        supervisor = cpus_of_threads(server.pid)
    assert len(threads) == len(cpus)
    assert supervisor == {cpus}  # the supervisor is not pinned
    # Only a pinned runlmtp worker's database threads are batch threads; never a worker's loop.
    own = os.sched_getscheduler(0)
    assert [each[pid] for pid, each in policies.items()] == [own] * len(cpus)
    batch = [tid for each in policies.values() for tid, policy in each.items() if policy == os.SCHED_BATCH]
    assert bool(batch) == (daemon == "runlmtp" and pin == "on")
    if pin == "off":
        assert threads == [{cpus}] * len(cpus)
        return
    # Worker i on the i-th CPU, its threads with it; runpop3's password-hashing threads, whose
    # argon2 lanes want CPUs of their own, anywhere (a worker that checked a password has one).
    pinned = [each - {cpus} for each in threads]
    assert sorted(tuple(sorted(each)) for each in pinned) == [((cpu,),) for cpu in cpus]
    hashing_anywhere = [cpus in each for each in threads]
    assert any(hashing_anywhere) if daemon == "runpop3" else not any(hashing_anywhere)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_workers_not_one_per_cpu_are_left_where_the_kernel_puts_them(tmp_path: Path, make_mailbox):
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2:
        pytest.skip("on one CPU a pinned worker runs where an unpinned one would")
    address = make_mailbox("unpinned@example.test").address
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS=str(len(cpus) + 1), DAEMON_PIN_WORKERS="on") as server:
        use_some_threads("runlmtp", server, address)
        threads = [cpus_of_threads(pid) for pid in server.workers()]
    assert threads == [{cpus}] * (len(cpus) + 1)


def test_a_worker_the_kernel_will_not_pin_runs_unpinned_and_says_so(monkeypatch, caplog):
    asked: list[set[int]] = []

    def refused(pid: int, cpus: set[int]) -> None:
        asked.append(cpus)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(prefork.os, "sched_setaffinity", refused)
    monkeypatch.setattr(prefork, "_cpus_before_pinning", None)
    with caplog.at_level(logging.WARNING, logger="mailadmin.prefork"):
        prefork._pin_to_one_cpu(0)
    assert prefork._cpus_before_pinning is None
    assert [record.getMessage() for record in caplog.records] == [
        f"worker {os.getpid()} not pinned to CPU 0: [Errno 1] Operation not permitted"
    ]
    prefork.unpin_this_thread()  # nothing to undo, nothing asked of the kernel
    assert asked == [{0}]


def test_a_thread_unpinned_runs_on_every_cpu_the_worker_had(monkeypatch):
    cpus = os.sched_getaffinity(0)
    monkeypatch.setattr(prefork, "_cpus_before_pinning", cpus)
    seen = []

    def in_a_pinned_thread() -> None:
        os.sched_setaffinity(0, {min(cpus)})
        prefork.unpin_this_thread()
        seen.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=in_a_pinned_thread)
    thread.start()
    thread.join()
    assert seen == [cpus]
