"""Linux scheduling policies for the daemons' threads.

A new thread inherits the policy of the thread that starts it, so a thread that serves the
whole process (the SQLite checkpointer) takes the process's own policy first, whichever thread
happened to start it.
"""

import logging
import os
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


def run_as_batch_thread() -> None:
    """Make this thread a batch thread (``SCHED_BATCH``): one that never preempts another when it
    wakes, and otherwise has the same share of the CPU.

    For the database threads of a worker pinned to a CPU (``mailadmin.prefork``): such a thread
    wakes when the loop hands it work and when its database answers, and as an ordinary thread
    it often takes the CPU from the loop there and then, mostly while the loop is running
    Python, holding the interpreter lock; it finds the lock held, sleeps again, and the loop
    resumes: two context switches for nothing. A batch thread runs once the loop blocks or its
    time slice ends. Where the system has no such policy, nothing changes; where it is refused,
    the thread says so and stays as it was.
    """
    if hasattr(os, "SCHED_BATCH"):
        _set_policy("SCHED_BATCH", lambda: (os.SCHED_BATCH, os.sched_param(0)))


def run_as_the_process() -> None:
    """Give this thread the policy and real-time priority of the process's main thread."""
    if hasattr(os, "sched_getscheduler"):
        pid = os.getpid()
        _set_policy("the process's", lambda: (os.sched_getscheduler(pid), os.sched_getparam(pid)))


def _set_policy(name: str, wanted: Callable[[], tuple[int, object]]) -> None:
    """Set the policy and parameters ``wanted()`` gives; a refusal, reading or setting, is a warning."""
    try:
        policy, parameters = wanted()
        os.sched_setscheduler(0, policy, parameters)
    except OSError as error:
        logger.warning(
            "thread %d keeps its scheduling policy, not %s: %s", threading.get_native_id(), name, error
        )
