"""Delivery figures and runlmtp heartbeats, through real runlmtp processes and the pipe door."""

from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.test.utils import CaptureQueriesContext

from mailadmin.console.figures import alive_processes
from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.figures import DeliveryTally, add_deliveries
from mailadmin.mailin.delivery import DeliveryStatus, deliver
from mailadmin.models import DeliveryFigures, LmtpNode
from mailadmin.pop3d.registry import stale_after
from tests.conftest import run_manage
from tests.lmtp_replies import (
    BYE,
    FULL_TEMPORARY,
    MAILBOX_DISABLED,
    RECIPIENT_OK,
    SAVED,
    START_DATA,
    TOO_BIG,
    USER_UNKNOWN,
)
from tests.lmtp_server import running_lmtp
from tests.pop3_server import wait_for
from tests.test_lmtp import WIRE_MESSAGE, begin, make_full_mailbox, stored_messages

pytestmark = [pytest.mark.django_db(transaction=True)]

# Heartbeats far apart: the refusals must then reach the database with a group commit or sign-off.
RARE_HEARTBEATS = "3600"


def outcomes() -> dict[tuple[str | None, str], tuple[int, int]]:
    rows = DeliveryFigures.objects.values_list("domain__name", "outcome", "messages", "size_bytes")
    totals: dict[tuple[str | None, str], tuple[int, int]] = {}
    for domain, outcome, messages, size_bytes in rows:  # an hour may have turned meanwhile
        before = totals.get((domain, outcome), (0, 0))
        totals[(domain, outcome)] = (before[0] + messages, before[1] + size_bytes)
    return totals


@pytest.mark.slow
def test_lmtp_counts_stored_copies_and_refusals_by_domain_and_reason(tmp_path: Path, make_mailbox, settings):
    good, other, inactive, full = "good@example.test", "o@other.test", "off@example.test", "full@example.test"
    for address in (good, other, inactive):
        make_mailbox(address)
    services.update_mailbox(Actor.cli(), inactive, active=False)
    make_full_mailbox(make_mailbox, full, settings)
    DeliveryFigures.objects.all().delete()  # the filler's delivery
    recipients = [good, "nobody@example.test", inactive, full, other, "x@elsewhere.test"]

    with running_lmtp(
        tmp_path / "lmtp", LMTP_HEARTBEAT_INTERVAL=RARE_HEARTBEATS, MAILADMIN_MAX_MESSAGE_SIZE_BYTES="2000"
    ) as server:
        with server.connect() as client:
            assert begin(client, recipients) == [
                RECIPIENT_OK,
                USER_UNKNOWN.format(rcpt="nobody@example.test"),
                MAILBOX_DISABLED.format(rcpt=inactive),
                FULL_TEMPORARY.format(rcpt=full),
                RECIPIENT_OK,
                USER_UNKNOWN.format(rcpt="x@elsewhere.test"),
            ]
            assert client.command("DATA") == START_DATA
            client.send(WIRE_MESSAGE)
            assert client.lines(2) == [SAVED.format(rcpt=good), SAVED.format(rcpt=other)]
            # The RCPT refusals were written in the transaction that stored the copies.
            size = len(stored_messages(good)[0])
            committed = {
                ("example.test", "delivered"): (1, size),
                ("other.test", "delivered"): (1, len(stored_messages(other)[0])),
                ("example.test", "no_such_mailbox"): (1, 0),
                ("example.test", "mailbox_inactive"): (1, 0),
                ("example.test", "over_quota"): (1, 0),
                (None, "no_such_mailbox"): (1, 0),
            }
            assert outcomes() == committed

            assert client.command("MAIL FROM:<s@remote.test>") == "250 2.1.0 Ok"
            assert client.command(f"RCPT TO:<{good}>") == RECIPIENT_OK
            assert client.command("DATA") == START_DATA
            client.send(b"Subject: big\r\n\r\n" + b"y" * 3000 + b"\r\n.\r\n")
            assert client.line() == TOO_BIG
            assert client.command("QUIT") == BYE
        assert outcomes() == committed  # no commit since: the refusal waits in the process
    # Written when the server signed off.
    assert outcomes() == {**committed, ("example.test", "too_large"): (1, 0)}


@pytest.mark.slow
def test_runlmtp_writes_refusals_with_its_heartbeat_when_nothing_is_delivered(tmp_path: Path, make_mailbox):
    make_mailbox("good@example.test")
    with running_lmtp(tmp_path / "lmtp", LMTP_HEARTBEAT_INTERVAL="0.2") as server:
        with server.connect() as client:
            assert begin(client, ["nobody@example.test"]) == [USER_UNKNOWN.format(rcpt="nobody@example.test")]
            assert wait_for(outcomes) == {("example.test", "no_such_mailbox"): (1, 0)}
            assert client.command("QUIT") == BYE


@pytest.mark.slow
def test_each_runlmtp_worker_heartbeats_as_a_process_of_its_own(tmp_path: Path):
    with running_lmtp(tmp_path / "lmtp", LMTP_HEARTBEAT_INTERVAL="0.2", LMTP_WORKERS="2"):
        wait_for(lambda: LmtpNode.objects.count() == 2)
        assert alive_processes()["runlmtp"] == 2
    assert not LmtpNode.objects.exists()


@pytest.mark.slow
def test_runlmtp_heartbeats_while_it_runs_and_signs_off_when_it_stops(tmp_path: Path):
    with running_lmtp(tmp_path / "lmtp", LMTP_HEARTBEAT_INTERVAL="0.2", LMTP_WORKERS="1") as server:
        node = wait_for(LmtpNode.objects.first)
        assert node.name.endswith(f":{server.pid}")
        wait_for(lambda: LmtpNode.objects.get().heartbeat_at > node.heartbeat_at)
        assert alive_processes()["runlmtp"] == 1
    assert not LmtpNode.objects.exists()
    assert alive_processes()["runlmtp"] == 0


@pytest.mark.slow
def test_a_runlmtp_that_died_drops_out_once_its_heartbeat_lapses(tmp_path: Path):
    with running_lmtp(tmp_path / "lmtp", LMTP_WORKERS="1") as server:
        wait_for(LmtpNode.objects.exists)
        server.kill()
    assert alive_processes()["runlmtp"] == 1  # its last heartbeat is still fresh
    lapsed = stale_after(django_settings.LMTP_HEARTBEAT_INTERVAL) + timedelta(seconds=1)
    node = LmtpNode.objects.get()
    LmtpNode.objects.update(heartbeat_at=node.heartbeat_at - lapsed)
    assert alive_processes()["runlmtp"] == 0


# --- The pipe door and the tally -------------------------------------------------------------


def test_the_pipe_counts_its_delivery_and_its_refusals(make_mailbox):
    make_mailbox("a@example.test")
    assert deliver(["a@example.test"], [b"Subject: x\r\n\r\nbody\r\n"])[0].delivered
    assert [
        r.status for r in deliver(["a@example.test", "b@example.test"], [b"x\r\n"], all_or_none=True)
    ] == [
        DeliveryStatus.NOT_ATTEMPTED,
        DeliveryStatus.NO_SUCH_MAILBOX,
    ]
    result = run_manage("deliver", "nobody@nowhere.test", input=b"Subject: y\n\nz\n")
    assert result.returncode == 67
    delivered = outcomes().pop(("example.test", "delivered"))
    assert delivered[0] == 1
    assert outcomes() == {
        ("example.test", "delivered"): delivered,
        ("example.test", "no_such_mailbox"): (1, 0),
        (None, "no_such_mailbox"): (1, 0),
    }


def test_a_delivery_adds_its_figures_with_one_statement_in_its_transaction(make_mailbox):
    make_mailbox("a@example.test")
    with CaptureQueriesContext(connection) as queries:
        deliver(["a@example.test"], [b"Subject: x\r\n\r\nbody\r\n"])
    upserts = [q["sql"] for q in queries.captured_queries if "mailadmin_deliveryfigures" in q["sql"]]
    assert len(upserts) == 1 and "ON CONFLICT" in upserts[0]


def test_a_tally_keeps_its_counts_when_the_transaction_writing_them_fails(make_mailbox):
    make_mailbox("a@example.test")
    tally = DeliveryTally()
    tally.add("example.test", "no_such_mailbox")
    tally.add("example.test", "no_such_mailbox")
    with pytest.raises(RuntimeError), tally.pending():
        raise RuntimeError("database gone")
    with tally.pending() as waiting:
        add_deliveries([], [], waiting)
    assert outcomes() == {("example.test", "no_such_mailbox"): (2, 0)}
    assert len(tally) == 0


def test_a_tally_bounds_the_domain_names_it_keeps_apart(monkeypatch):
    monkeypatch.setattr("mailadmin.hosting.figures.TALLY_MAX_DOMAINS", 2)
    tally = DeliveryTally()
    for name in ("a.test", "b.test", "c.test", "d.test", "a.test"):
        tally.add(name, "no_such_mailbox")
    assert sorted((domain or "-", count) for (_, domain, _), count in tally.drain().items()) == [
        ("-", 2),
        ("a.test", 2),
        ("b.test", 1),
    ]
