"""The thread pools' ``defer_to_the_loop``: threads that never preempt the loop when they wake
(``SCHED_BATCH``), still running the pool's own initializer; other pools keep ordinary threads."""

import asyncio
import os
import sys
import threading

import pytest

from mailadmin.executors import BoundedExecutor

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SCHED_BATCH is Linux's")


def policy_and_mark(marks: threading.local) -> tuple[int, str]:
    return os.sched_getscheduler(0), getattr(marks, "mark", "none")


def answers_of_two_units(executor: BoundedExecutor, marks: threading.local) -> list:
    async def run_two() -> list:
        return list(await asyncio.gather(*(executor.run(policy_and_mark, marks) for _ in range(2))))

    try:
        return asyncio.run(run_two())
    finally:
        executor.shutdown()


@pytest.mark.parametrize(
    ("defer", "policy"), [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)], ids=["deferring", "ordinary"]
)
def test_pool_threads_run_under_their_policy_and_run_the_initializer(defer, policy):
    marks = threading.local()
    executor = BoundedExecutor(
        2, "test-pool", initializer=lambda: setattr(marks, "mark", "started"), defer_to_the_loop=defer
    )
    assert answers_of_two_units(executor, marks) == [(policy, "started"), (policy, "started")]


def test_the_thread_that_starts_a_deferring_pool_keeps_its_policy():
    executor = BoundedExecutor(1, "test-pool", defer_to_the_loop=True)
    assert answers_of_two_units(executor, threading.local()) == [(os.SCHED_BATCH, "none")] * 2
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
