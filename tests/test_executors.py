"""Batch threads (``mailadmin.scheduling``): a pool's threads that never preempt the loop when
they wake, still running the pool's own initializer; other pools keep ordinary threads; a
refused policy changes nothing but a warning; the SQLite checkpointer runs under the process's
policy whichever thread starts it."""

import asyncio
import logging
import os
import queue
import sys
import threading

import pytest

from mailadmin import scheduling
from mailadmin.executors import BoundedExecutor
from mailadmin.sqlite.base import Checkpointer

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH is Linux's")
BATCH = getattr(os, "SCHED_BATCH", None)


@pytest.fixture
def own_policy() -> int:
    """The policy the tests run under, which new threads inherit (ordinary, unless run under batch)."""
    return os.sched_getscheduler(0)


def policy_and_mark(marks: threading.local) -> tuple[int, str]:
    return os.sched_getscheduler(0), getattr(marks, "mark", "none")


def answers_of_two_units(executor: BoundedExecutor, marks: threading.local) -> list:
    async def run_two() -> list:
        return list(await asyncio.gather(*(executor.run(policy_and_mark, marks) for _ in range(2))))

    try:
        return asyncio.run(run_two())
    finally:
        executor.shutdown()


def marking_pool(marks: threading.local, batch_threads: bool, threads: int = 2) -> BoundedExecutor:
    return BoundedExecutor(
        threads,
        "test-pool",
        initializer=lambda: setattr(marks, "mark", "started"),
        batch_threads=batch_threads,
    )


def test_a_batch_pools_threads_are_batch_threads_and_run_the_initializer():
    marks = threading.local()
    assert answers_of_two_units(marking_pool(marks, True), marks) == [(BATCH, "started")] * 2


def test_an_ordinary_pools_threads_keep_the_policy_and_run_the_initializer(own_policy):
    marks = threading.local()
    assert answers_of_two_units(marking_pool(marks, False), marks) == [(own_policy, "started")] * 2


def test_the_thread_that_starts_a_batch_pool_keeps_its_policy(own_policy):
    executor = BoundedExecutor(1, "test-pool", batch_threads=True)
    assert answers_of_two_units(executor, threading.local()) == [(BATCH, "none")] * 2
    assert os.sched_getscheduler(0) == own_policy


@pytest.mark.parametrize("refused", ["sched_setscheduler", "sched_getscheduler"])
def test_a_refused_policy_leaves_the_thread_as_it_was_and_says_so(refused, monkeypatch, caplog, own_policy):
    def refuse(*_args) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, refused, refuse)
    marks = threading.local()
    with caplog.at_level(logging.WARNING, logger="mailadmin.scheduling"):
        if refused == "sched_setscheduler":  # a pool of one thread: one warning
            assert answers_of_two_units(marking_pool(marks, True, 1), marks) == [(own_policy, "started")] * 2
        else:  # reading the process's policy refused
            scheduling.run_as_the_process()
    assert [record.getMessage().split(": ", 1)[1] for record in caplog.records] == [
        "[Errno 1] Operation not permitted"
    ]


def test_a_checkpointer_started_by_a_batch_thread_runs_under_the_process_policy(tmp_path, own_policy):
    """Threads inherit their starter's policy; the checkpointer serves the whole process."""
    if own_policy == BATCH:
        pytest.skip("the tests run as batch threads: the checkpointer's policy would tell nothing")
    policies: queue.Queue[int] = queue.Queue()

    def pause(_seconds: float) -> None:  # runs in the checkpointer's thread, after a checkpoint
        policies.put(os.sched_getscheduler(0))
        threading.Event().wait()  # a daemon thread: it stays here until the tests end

    started: list[Checkpointer] = []

    def start_from_a_batch_thread() -> None:
        scheduling.run_as_batch_thread()
        started.append(Checkpointer(str(tmp_path / "mail.sqlite3"), pause=pause))

    starter = threading.Thread(target=start_from_a_batch_thread)
    starter.start()
    starter.join()
    started[0].request()
    assert policies.get(timeout=10) == own_policy
