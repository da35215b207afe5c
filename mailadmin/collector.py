"""Python's cycle collector held off around work that makes many objects at once.

Each new container object counts towards the collector's thresholds, and the collections that a
burst of them sets off walk every object of the process again and again: two thirds of reading a
100,000-message login snapshot (0.25-0.3 s against 0.12 s without), or a 70 ms full collection
inside a prune batch that holds the database's write turn meanwhile.
"""

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pauses = 0
_pauses_lock = threading.Lock()
_enabled_before = True


@contextmanager
def collection_paused() -> Iterator[None]:
    """The collector off, in every thread, until the last pause of any thread ends.

    For work whose objects have no cycles, or not many: what it leaves is collected once the
    collector is back on, as it was before the first pause (one switched off already stays off).
    """
    global _pauses, _enabled_before
    with _pauses_lock:
        if _pauses == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _enabled_before:
                gc.enable()
