"""Concurrent writers and large messages, with real processes on the real database."""

import json
import subprocess
import sys

import pytest

from mailadmin.delivery import trace_headers
from mailadmin.models import Domain, Message
from mailadmin.store import iter_message_bytes
from tests.conftest import PROJECT_DIR, child_environment

pytestmark = pytest.mark.django_db(transaction=True)

BODY_BYTES = 100
WORKERS = 4
DELIVERIES_PER_WORKER = 50


def spawn(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.workers.{module}", *args],
        cwd=PROJECT_DIR,
        env=child_environment(MAILADMIN_QUOTA_WARNING_PERCENTS=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)


def test_four_processes_never_overfill_a_mailbox_with_room_for_exactly_100(make_mailbox):
    address = "race@example.test"
    message_size = len(trace_headers("", address)) + BODY_BYTES + 2  # the body gains a final CRLF
    mailbox = make_mailbox(address, quota_bytes=100 * message_size)
    workers = [
        spawn("deliver_many", address, str(DELIVERIES_PER_WORKER), str(BODY_BYTES)) for _ in range(WORKERS)
    ]
    tallies = [finish(worker) for worker in workers]
    assert sum(t.get("DELIVERED", 0) for t in tallies) == 100
    assert sum(t.get("OVER_QUOTA", 0) for t in tallies) == 100
    mailbox.refresh_from_db()
    assert Message.objects.filter(mailbox=mailbox).count() == 100
    assert (mailbox.used_bytes, mailbox.used_messages) == (100 * message_size, 100)
    assert Domain.objects.get(name="example.test").used_bytes == 100 * message_size
    uidls = list(Message.objects.filter(mailbox=mailbox).values_list("uidl", flat=True))
    assert len(set(uidls)) == 100


def test_a_30_mb_delivery_keeps_peak_memory_near_the_chunk_size(make_mailbox, tmp_path):
    mailbox = make_mailbox("big@example.test")
    line = b"0123456789abcdef" * 4 + b"\n"  # LF endings: the store must rewrite every line
    lines = 30 * 1024 * 1024 // len(line)
    path = tmp_path / "big.eml"
    with path.open("wb") as handle:
        handle.write(b"Subject: big\n\n")
        for _ in range(lines):
            handle.write(line)
    report = finish(spawn("delivery_memory", mailbox.address, str(path)))
    assert report["status"] == "DELIVERED"
    message = Message.objects.get(mailbox=mailbox, subject="big")
    expected_size = (
        len(trace_headers("", mailbox.address)) + len(b"Subject: big\r\n\r\n") + lines * (len(line) + 1)
    )
    assert message.size_bytes == expected_size
    assert sum(len(chunk) for chunk in iter_message_bytes(message.pk)) == expected_size
    # 30 MiB went through; a bounded pipeline holds a few 256 KiB chunks at a time.
    print(f"peak RSS growth for a {expected_size} byte delivery: {report['growth_bytes']} bytes")
    assert report["growth_bytes"] < 8 * 1024 * 1024
