"""``python -m tests.workers.loaded_modules REPORT SCRIPT ARG...``: run SCRIPT as ``__main__``.

At exit (a ``sys.exit`` included) it writes to REPORT, as JSON, which of the heavy packages the
script imported, so a test can tell which path a command took without timing it.
"""

import atexit
import json
import runpy
import sys
from pathlib import Path

WATCHED = frozenset({"django", "daphne", "twisted", "psycopg", "channels"})


def main() -> None:
    report, script, *arguments = sys.argv[1:]

    def write_report() -> None:
        loaded = {name.partition(".")[0] for name in sys.modules} & WATCHED
        Path(report).write_text(json.dumps(sorted(loaded)))

    atexit.register(write_report)
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
