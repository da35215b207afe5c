"""Deliver COUNT copies of a SIZE-byte message to ADDRESS; print the status tally as JSON."""

import collections
import json
import os
import sys

import django


def main(address: str, count: int, size: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")
    django.setup()
    from mailadmin.mailin.delivery import deliver

    tally = collections.Counter(deliver([address], [b"x" * size])[0].status.name for _ in range(count))
    print(json.dumps(tally))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
