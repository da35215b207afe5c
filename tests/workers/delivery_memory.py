"""Deliver the file PATH to ADDRESS; print the peak-RSS growth the delivery caused, in bytes.

The baseline is taken after a warm-up delivery, so imports, the database connection and
caches are already paid for and only the large message's cost remains.
"""

import json
import os
import sys

import django


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(address: str, path: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailadmin.settings")
    django.setup()
    from mailadmin.mailin.delivery import deliver

    deliver([address], [b"Subject: warm-up\r\n\r\nhello\r\n"])
    baseline = peak_rss_bytes()
    with open(path, "rb") as message:
        [result] = deliver([address], message)
    print(json.dumps({"status": result.status.name, "growth_bytes": peak_rss_bytes() - baseline}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
