"""What ``POP3_WORKERS``/``LMTP_WORKERS`` and ``--workers`` accept: a number, or ``auto``.

``auto`` is the number of CPUs this process may run on (its affinity mask, which containers and
``taskset`` narrow), so a default install uses every core it is given. Standard library only:
settings import it.
"""

import os

AUTO = "auto"


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def parse_worker_count(value: str | int) -> int:
    """``auto`` or a whole number of at least 1; ValueError otherwise."""
    text = str(value).strip().lower()
    count = usable_cpus() if text == AUTO else int(text)
    if count < 1:
        raise ValueError(f"a worker count must be at least 1 or {AUTO!r}, got {value!r}")
    return count
