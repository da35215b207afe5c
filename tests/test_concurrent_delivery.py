"""Concurrent writers and large messages, with real processes on the real database."""

import json
import subprocess
import sys
import threading

import pytest
from django.db import connection

from mailadmin.hosting import store
from mailadmin.hosting.store import iter_message_bytes
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    deliver_group,
    look_up_recipient,
    trace_headers,
)
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import Domain, Message
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


def test_groups_charging_the_same_mailboxes_in_opposite_orders_never_deadlock(make_mailbox, settings):
    """Two LMTP workers' groups: every copy stored, no deadlock (PostgreSQL's row locks)."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    addresses = ["a@one.test", "b@two.test", "c@one.test", "d@two.test"]
    for address in addresses:
        make_mailbox(address)
    errors: list[BaseException] = []

    def deliver_groups(order: list[str]) -> None:
        try:
            for round_number in range(25):
                deliveries = []
                for address in order:
                    found = look_up_recipient(address)
                    assert isinstance(found, Recipient), found
                    body = f"Subject: {round_number}\r\n\r\nto {address}\r\n".encode()
                    deliveries.append(Delivery([found], spool_message([body]), "s@remote.test"))
                results = deliver_group(deliveries)
                assert [result[0].status for result in results] == [DeliveryStatus.DELIVERED] * len(order)
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=deliver_groups, args=(addresses,)),
        threading.Thread(target=deliver_groups, args=(addresses[::-1],)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert [Message.objects.filter(mailbox__user__username=a).count() for a in addresses] == [50] * 4
    assert store.recalculate_quota() == []
