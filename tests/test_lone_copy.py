"""A delivery of one copy, the usual LMTP delivery, stored by one statement committed on its own
(PostgreSQL: ``store.append_lone_copy``); whatever it does not store, the group's transaction
stores or refuses as it would any other."""

import threading
from contextlib import contextmanager

import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.models import Sum

from mailadmin.hosting import figures, store
from mailadmin.hosting.store import fastsql
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    deliver_group,
    look_up_recipient,
    trace_headers,
)
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import DeliveryFigures, Domain, Mailbox, Message, MessageChunk

pytestmark = pytest.mark.django_db(transaction=True)

SENDER = "sender@remote.test"
BODY = b"Subject: alone\r\nFrom: Ann <ann@remote.test>\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def postgresql_only(settings):
    if not fastsql.stores_lone_copies():
        pytest.skip("one statement for a lone copy is PostgreSQL's: SQLite has no writes in WITH")
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""


@contextmanager
def statements():
    """The statements the connection sends meanwhile (an execute wrapper sees the chunk writes too)."""
    seen: list[str] = []

    def record(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield seen


def recipient(address: str) -> Recipient:
    found = look_up_recipient(address)
    assert isinstance(found, Recipient), found
    return found


def deliver_one(address: str, body: bytes = BODY, tally: figures.DeliveryTally | None = None):
    delivery = Delivery([recipient(address)], spool_message([body]), SENDER)
    with statements() as seen:
        results = deliver_group([delivery], tally)
    return [(result.status, result.uidl) for result in results[0]], seen


def counters(address: str) -> tuple[int, int, int, int]:
    mailbox = Mailbox.objects.get(user__username=address)
    return mailbox.used_bytes, mailbox.used_messages, mailbox.next_uid, mailbox.changes


def delivered_figures() -> list[tuple[int, int]]:
    rows = DeliveryFigures.objects.filter(outcome=DeliveryFigures.DELIVERED)
    return list(rows.values_list("messages", "size_bytes"))


def test_a_lone_copy_is_one_statement_that_writes_all_a_group_would(make_mailbox):
    mailbox = make_mailbox("ann@alone.test")

    results, seen = deliver_one("ann@alone.test")

    assert len(seen) == 1 and seen[0].startswith("WITH room AS MATERIALIZED")
    message = Message.objects.get()
    expected_uidl = store.format_uidl(1, mailbox.uid_validity)
    assert results == [(DeliveryStatus.DELIVERED, expected_uidl)]
    stored = b"".join(
        MessageChunk.objects.filter(message=message).order_by("seq").values_list("data", flat=True)
    )
    assert stored.endswith(BODY) and stored.startswith(b"Return-Path: <sender@remote.test>\r\n")
    assert (message.uidl, message.size_bytes, message.subject, message.from_header) == (
        expected_uidl,
        len(stored),
        "alone",
        "Ann <ann@remote.test>",
    )
    assert message.header_size_bytes == stored.index(b"\r\n\r\n") + 4
    assert (message.envelope_sender, message.import_key) == (SENDER, None)
    assert counters("ann@alone.test") == (len(stored), 1, 2, 1)
    assert Domain.objects.get(name="alone.test").used_bytes == len(stored)
    assert delivered_figures() == [(1, len(stored))]


def test_a_second_lone_copy_adds_to_the_counters_and_figures(make_mailbox):
    make_mailbox("ann@alone.test")
    deliver_one("ann@alone.test")
    deliver_one("ann@alone.test")
    sizes = list(Message.objects.order_by("pk").values_list("size_bytes", flat=True))
    assert counters("ann@alone.test") == (sum(sizes), 2, 3, 2)
    assert delivered_figures() == [(2, sum(sizes))]


@pytest.mark.parametrize(
    ("next_uid", "uid_validity"),
    [(2**32 - 1, 1), (2**32, 0xABCDEF), (2**40 + 5, 2**33 + 17)],
    ids=["eight digits", "nine digits", "both longer"],
)
def test_the_uidl_written_in_sql_is_the_one_format_uidl_gives(make_mailbox, next_uid, uid_validity):
    make_mailbox("ann@alone.test")
    Mailbox.objects.filter(user__username="ann@alone.test").update(
        next_uid=next_uid, uid_validity=uid_validity
    )

    results, _ = deliver_one("ann@alone.test")

    expected = store.format_uidl(next_uid, uid_validity)
    assert results == [(DeliveryStatus.DELIVERED, expected)]
    assert Message.objects.get().uidl == expected


def test_a_mailbox_full_by_the_commit_gets_nothing_and_the_refusal_is_counted(make_mailbox):
    make_mailbox("ann@alone.test", quota_bytes=10_000)
    found = recipient("ann@alone.test")  # room at RCPT
    Mailbox.objects.filter(pk=found.mailboxes[0].pk).update(quota_bytes=10)

    with statements() as seen:
        results = deliver_group([Delivery([found], spool_message([BODY]), SENDER)])

    assert [result.status for result in results[0]] == [DeliveryStatus.OVER_QUOTA]
    assert len(seen) > 1  # the group's transaction, after the one statement wrote nothing
    assert counters("ann@alone.test") == (0, 0, 1, 0)
    assert Message.objects.count() == MessageChunk.objects.count() == 0
    assert Domain.objects.get(name="alone.test").used_bytes == 0
    assert list(DeliveryFigures.objects.values_list("outcome", "messages")) == [("over_quota", 1)]


def test_a_domain_full_by_the_commit_leaves_its_mailbox_as_it_was(make_mailbox):
    make_mailbox("ann@alone.test")
    found = recipient("ann@alone.test")
    Domain.objects.filter(name="alone.test").update(quota_bytes=10)

    results = deliver_group([Delivery([found], spool_message([BODY]), SENDER)])

    assert [result.status for result in results[0]] == [DeliveryStatus.OVER_QUOTA]
    used_bytes, used_messages, _, _ = counters("ann@alone.test")
    assert (used_bytes, used_messages, Message.objects.count()) == (0, 0, 0)
    assert Domain.objects.get(name="alone.test").used_bytes == 0
    assert delivered_figures() == []


def test_a_copy_the_database_refuses_is_a_temporary_failure_and_writes_nothing(make_mailbox):
    """A mailbox whose next UID is already some message's UIDL (restored from an old backup)."""
    mailbox = make_mailbox("ann@alone.test")
    deliver_one("ann@alone.test")
    Mailbox.objects.filter(pk=mailbox.pk).update(next_uid=1)
    before = counters("ann@alone.test")

    results, _ = deliver_one("ann@alone.test")

    assert [status for status, _ in results] == [DeliveryStatus.TEMPORARY_FAILURE]
    assert counters("ann@alone.test") == before
    assert Message.objects.count() == 1
    assert [messages for messages, _ in delivered_figures()] == [1]


def test_refusals_waiting_in_the_tally_go_with_the_groups_transaction(make_mailbox):
    make_mailbox("ann@alone.test")
    tally = figures.DeliveryTally()
    tally.add("alone.test", "no_such_mailbox")

    results, seen = deliver_one("ann@alone.test", tally=tally)

    assert [status for status, _ in results] == [DeliveryStatus.DELIVERED]
    assert not any(sql.startswith("WITH room") for sql in seen)
    assert len(tally) == 0
    outcomes = dict(DeliveryFigures.objects.values_list("outcome", "messages"))
    assert outcomes == {"no_such_mailbox": 1, DeliveryFigures.DELIVERED: 1}


def test_a_copy_larger_than_a_chunk_goes_by_the_groups_transaction(make_mailbox, settings):
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 16
    make_mailbox("ann@alone.test")

    results, seen = deliver_one("ann@alone.test")

    assert [status for status, _ in results] == [DeliveryStatus.DELIVERED]
    assert not any(sql.startswith("WITH room") for sql in seen)
    message = Message.objects.get()
    chunks = list(MessageChunk.objects.filter(message=message).order_by("seq").values_list("data", flat=True))
    assert [len(chunk) for chunk in chunks[:-1]] == [16] * (len(chunks) - 1)
    assert len(b"".join(chunks)) == message.size_bytes


def test_inside_a_callers_transaction_the_group_path_is_taken(make_mailbox):
    make_mailbox("ann@alone.test")
    with transaction.atomic():
        results, seen = deliver_one("ann@alone.test")
    assert [status for status, _ in results] == [DeliveryStatus.DELIVERED]
    assert not any(sql.startswith("WITH room") for sql in seen)
    assert Message.objects.count() == 1


def test_the_mailbox_is_locked_before_the_statement_waits_for_the_domain(make_mailbox):
    """Every writer locks a mailbox's row before its domain's (the POP3 deletions, the groups,
    ``delete_mailbox``): the one statement too, or it could deadlock with them."""
    mailbox = make_mailbox("ann@alone.test")
    found = recipient("ann@alone.test")
    outcome: dict[str, object] = {}
    holder = connections.create_connection("default")
    prober = connections.create_connection("default")
    try:
        holder.set_autocommit(False)
        with holder.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {Domain._meta.db_table} WHERE id = %s FOR UPDATE", [mailbox.domain_id]
            )

        def deliver() -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    outcome["pid"] = cursor.fetchone()[0]
                with statements() as seen:
                    outcome["results"] = deliver_group([Delivery([found], spool_message([BODY]), SENDER)])
                outcome["statements"] = seen
            finally:
                connection.close()

        delivering = threading.Thread(target=deliver)
        delivering.start()
        assert _until_waiting_for_a_lock(prober, outcome)
        locked = _row_locked(prober, Mailbox, mailbox.pk)
        holder.commit()
        delivering.join(timeout=60)
    finally:
        holder.close()
        prober.close()

    assert locked, "the statement waited for the domain without holding its mailbox"
    assert [result.status for result in outcome["results"][0]] == [DeliveryStatus.DELIVERED]
    assert [sql[:26] for sql in outcome["statements"]] == ["WITH room AS MATERIALIZED "]
    assert Message.objects.count() == 1


@pytest.mark.parametrize("full", ["mailbox", "domain"])
def test_two_lone_copies_racing_for_the_last_room_store_one(make_mailbox, full):
    """Both had room at RCPT, and both statements are made to wait at the full row at once (held
    by a third connection): the mailbox's room is checked under its lock, the domain's by its
    charge, so exactly one copy gets in and the other statement writes nothing."""
    addresses = ["ann@race.test", "ann@race.test" if full == "mailbox" else "bob@race.test"]
    for address in sorted(set(addresses)):
        make_mailbox(address)
    found = [recipient(address) for address in addresses]
    size = len(trace_headers(SENDER, "ann@race.test")) + len(BODY) + 10  # room for one copy, not two
    full_row = Mailbox.objects.get(user__username="ann@race.test") if full == "mailbox" else None
    if full_row is not None:
        Mailbox.objects.filter(pk=full_row.pk).update(quota_bytes=size)
    else:
        full_row = Domain.objects.get(name="race.test")
        Domain.objects.filter(pk=full_row.pk).update(quota_bytes=size)
    racers = [{} for _ in found]
    holder = connections.create_connection("default")
    prober = connections.create_connection("default")

    def deliver(to: Recipient, outcome: dict) -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                outcome["pid"] = cursor.fetchone()[0]
            with statements() as seen:
                [[result]] = deliver_group([Delivery([to], spool_message([BODY]), SENDER)])
            outcome["status"], outcome["first statement"] = result.status, seen[0][:26]
        finally:
            connection.close()

    try:
        holder.set_autocommit(False)
        with holder.cursor() as cursor:
            table = full_row._meta.db_table
            cursor.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", [full_row.pk])
        threads = [threading.Thread(target=deliver, args=pair) for pair in zip(found, racers, strict=True)]
        for thread in threads:
            thread.start()
        waiting = [_until_waiting_for_a_lock(prober, outcome) for outcome in racers]
        holder.commit()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        holder.close()
        prober.close()

    assert waiting == [True, True]
    assert [outcome["first statement"] for outcome in racers] == ["WITH room AS MATERIALIZED "] * 2
    assert sorted(outcome["status"].value for outcome in racers) == sorted(
        [DeliveryStatus.DELIVERED.value, DeliveryStatus.OVER_QUOTA.value]
    )
    stored = Message.objects.get()
    assert Mailbox.objects.aggregate(Sum("used_bytes"), Sum("used_messages")) == {
        "used_bytes__sum": stored.size_bytes,
        "used_messages__sum": 1,
    }
    assert Domain.objects.get(name="race.test").used_bytes == stored.size_bytes
    assert delivered_figures() == [(1, stored.size_bytes)]


def _until_waiting_for_a_lock(prober, outcome: dict) -> bool:
    for _ in range(600):
        if "pid" in outcome:
            with prober.cursor() as cursor:
                cursor.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [outcome["pid"]]
                )
                row = cursor.fetchone()
            if row is not None and row[0] == "Lock":
                return True
        threading.Event().wait(0.05)
    return False


def _row_locked(prober, model: type, pk: int) -> bool:
    """Whether another transaction holds a lock on the row (a ``NOWAIT`` attempt fails)."""
    prober.set_autocommit(False)
    try:
        with prober.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM {model._meta.db_table} WHERE id = %s FOR NO KEY UPDATE NOWAIT", [pk]
            )
        return False
    except OperationalError:
        return True
    finally:
        prober.rollback()
        prober.set_autocommit(True)
