"""Worker processes that share their parent's listening sockets (pre-fork).

One asyncio process uses one core: its event loop and its database threads share one GIL.
With ``--workers N`` a daemon binds its sockets, forks N copies of itself that each serve them
(the kernel hands every new connection to one worker), and stays behind as a small supervisor.
Nothing the workers share lives in memory: leases, sessions, penalties and quotas are rows.
"""

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable

from django.db import connections

from mailadmin.workercount import AUTO, parse_worker_count

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def worker_count_argument(value: str) -> int:
    """``--workers``: a number of at least 1, or ``auto`` for one per usable CPU."""
    try:
        return parse_worker_count(value)
    except ValueError:
        expected = f"expected a number of at least 1 or {AUTO!r}, got {value!r}"
        raise argparse.ArgumentTypeError(expected) from None


def run_workers(
    count: int, serve: Callable[[], None], started: Callable[[], None], *, pin_to_cpus: bool = False
) -> int:
    """Fork ``count`` workers that each run ``serve()``; return once all have ended.

    ``started()`` runs in the parent once every worker exists (to announce the listeners).
    With ``pin_to_cpus``, and as many workers as CPUs this process may use, worker *i* and every
    thread it starts run on the *i*-th of those CPUs: see :func:`_pin_to_one_cpu`.

    SIGTERM, SIGINT and SIGHUP are passed on to every worker. A worker that ends while nothing
    asked it to stop takes the others down with it, and the result is 1: a supervisor
    (systemd's ``Restart=on-failure``) restarts the daemon whole, with fresh sockets, rather
    than this process patching up a half-working set. Otherwise the result is 0 when every
    worker ended cleanly (or by the stop signal passed on to it) and 1 if not.
    """
    connections.close_all()  # a connection must never be shared across a fork
    sys.stdout.flush()
    sys.stderr.flush()
    supervisor = _Supervisor()
    # Held back until the parent can pass them on: a SIGTERM between the first fork and the
    # handlers would otherwise end the parent alone and leave its workers behind.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        try:
            parent = os.getpid()
            cpus = sorted(os.sched_getaffinity(0)) if pin_to_cpus else []
            for index in range(count):
                pid = os.fork()
                if pid == 0:
                    os._exit(_worker(serve, parent, cpus[index] if len(cpus) == count else None))
                supervisor.workers.add(pid)
        except OSError:  # out of processes or memory: take back the workers already started
            supervisor.stop_all()
            raise
        previous = {signum: signal.signal(signum, supervisor.forward) for signum in FORWARDED_SIGNALS}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    try:
        started()
        return supervisor.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# The CPUs this worker could use before it was pinned to one (None: not pinned).
_cpus_before_pinning: set[int] | None = None


def _pin_to_one_cpu(cpu: int) -> None:
    """Keep this worker, and the threads it starts (they inherit it), on ``cpu``.

    A worker's event loop hands every unit of database work to a thread of its own and takes
    the result back: two wake-ups of another thread per unit, and the interpreter lock passed
    between them. Across two CPUs each wake-up is an interrupt from one to the other, which on
    a virtual machine costs a trip through the hypervisor: a hop to a thread and back took 85
    microseconds of CPU with the two threads free to run anywhere, 47 on one CPU. Only one of
    a worker's threads runs Python at a time; work outside the interpreter lock that wants CPUs
    of its own (argon2's lanes) runs in threads that call :func:`unpin_this_thread`. With each
    worker on a CPU of its own, the bench's LMTP deliveries and POP3 RETRs took less CPU each,
    and more went through a second (docs/benchmarks.md, "Workers pinned to CPUs").

    An optional speed-up: where the kernel refuses (a sandbox, a cpuset that changed), the
    worker says so and runs where the kernel puts it.
    """
    global _cpus_before_pinning
    try:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
    except OSError as error:
        logger.warning("worker %d not pinned to CPU %d: %s", os.getpid(), cpu, error)
        return
    _cpus_before_pinning = allowed


def pinned() -> bool:
    """Whether this process is a worker kept to one CPU (:func:`_pin_to_one_cpu`)."""
    return _cpus_before_pinning is not None


def unpin_this_thread() -> None:
    """Let this thread, and the threads it starts, run on any CPU the worker could use before it
    was pinned: for work that needs no event loop and may use CPUs of its own (argon2's lanes)."""
    if _cpus_before_pinning is not None:
        try:
            os.sched_setaffinity(0, _cpus_before_pinning)
        except OSError as error:
            logger.warning("thread not unpinned: %s", error)


def stop_children(children: Iterable[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every child still running, wait up to ``grace_seconds`` for all, SIGKILL the rest."""
    children = list(children)
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def die_with_parent(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def _worker(serve: Callable[[], None], parent: int, cpu: int | None) -> int:
    # A daemon killed with SIGKILL takes its workers with it, as a single process would go:
    # none is left holding the listeners, its sessions or their leases.
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        return 1
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    try:
        if cpu is not None:
            _pin_to_one_cpu(cpu)
        serve()
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


class _Supervisor:
    def __init__(self) -> None:
        self.workers: set[int] = set()
        self.stopping = False
        self.failed = False

    def forward(self, signum: int, frame: object) -> None:
        self.stopping = self.stopping or signum in STOP_SIGNALS
        for pid in self.workers:
            _signal(pid, signum)

    def stop_all(self) -> None:
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        self.workers.clear()

    def wait(self) -> int:
        while self.workers:
            pid, status = os.wait()
            self.workers.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                self.failed = self.failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
                continue
            logger.error("worker %d ended unexpectedly (exit status %d); stopping the others", pid, code)
            self.failed = self.stopping = True
            for other in self.workers:
                _signal(other, signal.SIGTERM)
        return 1 if self.failed else 0


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
