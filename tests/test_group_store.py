"""The store's group append: a group's copies in a few statements, whatever their number, with the
results storing them one at a time would give."""

import re
import threading
from contextlib import contextmanager

import pytest
from django.db import DatabaseError, OperationalError, connection, transaction
from django.utils import timezone

from mailadmin.hosting import aliases, store
from mailadmin.hosting.actors import Actor
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

pytestmark = pytest.mark.django_db


@contextmanager
def statements():
    """Every statement the connection executes meanwhile, as "UPDATE <table>", "SELECT <table>"...

    Through an execute wrapper, which also sees the chunk writes that DEBUG's query log leaves out.
    Savepoints are left out: inside the test's transaction they stand for the BEGIN and COMMIT
    (or ROLLBACK) of the group's own.
    """
    seen: list[str] = []

    def record(execute, sql, params, many, context):
        if not sql.startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT")):
            seen.append(summary(sql))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield seen


def summary(sql: str) -> str:
    if selected := re.match(r'SELECT .*? FROM "?(\w+)', sql):
        return f"SELECT {selected[1]}"
    written = re.search(r'\b(UPDATE|INSERT INTO|DELETE FROM) "?(\w+)', sql)
    return f"{written[1]} {written[2]}"


def table(model: type) -> str:
    return model._meta.db_table


def recipient(address: str) -> Recipient:
    found = look_up_recipient(address)
    assert isinstance(found, Recipient), found
    return found


@pytest.mark.parametrize("messages", [2, 8, 32])
def test_a_group_to_3_mailboxes_in_2_domains_is_five_statements_and_charges_domains_last(
    make_mailbox, settings, messages
):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    addresses = ["a@one.test", "b@one.test", "c@two.test"]
    for address in addresses:
        make_mailbox(address)
    recipients = [recipient(address) for address in addresses]
    deliveries = [
        Delivery([recipients[n % 3]], spool_message([b"Subject: %d\r\n\r\nbody\r\n" % n]), "s@remote.test")
        for n in range(messages)
    ]

    with statements() as seen:
        results = deliver_group(deliveries)

    assert all(result.delivered for group in results for result in group)
    # PostgreSQL locks the group's mailboxes first, in id order (lock_group), and its domains
    # (two, once a copy goes to c@two.test) in id order just before charging them: last, so that
    # their rows, which every delivery to the domain charges, stay locked only for the charge,
    # the figures and the commit.
    postgresql = connection.vendor == "postgresql"
    assert seen == [
        *([f"SELECT {table(Mailbox)}"] if postgresql else []),
        f"UPDATE {table(Mailbox)}",
        f"INSERT INTO {table(Message)}",
        f"INSERT INTO {table(MessageChunk)}",
        *([f"SELECT {table(Domain)}"] if postgresql and messages > 2 else []),
        f"UPDATE {table(Domain)}",
        f"INSERT INTO {table(DeliveryFigures)}",
    ]
    assert Message.objects.count() == messages


def group_copy(mailbox: Mailbox, body: bytes) -> store.GroupCopy:
    return store.GroupCopy(mailbox, spool_message([body]), b"", "")


def counters(mailbox: Mailbox) -> tuple[int, int, int]:
    mailbox.refresh_from_db()
    return mailbox.used_bytes, mailbox.used_messages, mailbox.next_uid


def test_copies_to_one_mailbox_take_its_uids_and_usage_in_group_order(make_mailbox):
    first, second = make_mailbox("first@example.test"), make_mailbox("second@example.test")
    bodies = [b"a" * 8 + b"\r\n", b"b" * 18 + b"\r\n", b"c" * 28 + b"\r\n", b"d" * 38 + b"\r\n"]
    with transaction.atomic():
        stored = store.append_messages_in_group(
            [
                group_copy(mailbox, body)
                for mailbox, body in zip([first, second, first, first], bodies, strict=True)
            ]
        )

    uid_validity = first.uid_validity
    assert [(s.uidl, s.size_bytes, s.mailbox_used_bytes) for s in stored] == [
        (store.format_uidl(1, uid_validity), 10, 10),
        (store.format_uidl(1, second.uid_validity), 20, 20),
        (store.format_uidl(2, uid_validity), 30, 40),
        (store.format_uidl(3, uid_validity), 40, 80),
    ]
    assert counters(first) == (80, 3, 4)
    assert counters(second) == (20, 1, 2)
    assert Domain.objects.get(pk=first.domain_id).used_bytes == 100
    assert [b"".join(store.iter_message_bytes(s.message_id)) for s in stored] == bodies


def test_a_mailbox_without_room_for_all_its_copies_gets_those_that_fit_in_order(make_mailbox):
    roomy = make_mailbox("roomy@example.test")
    tight = make_mailbox("tight@example.test", quota_messages=2)
    body = b"x" * 8 + b"\r\n"
    with transaction.atomic():
        stored = store.append_messages_in_group([group_copy(m, body) for m in (tight, roomy, tight, tight)])

    assert [s is not None for s in stored] == [True, True, True, False]
    assert [s.uidl for s in stored[::2]] == [
        store.format_uidl(1, tight.uid_validity),
        store.format_uidl(2, tight.uid_validity),
    ]
    assert counters(tight) == (20, 2, 3)  # the copy refused never took a UID
    assert counters(roomy) == (10, 1, 2)
    assert Domain.objects.get(pk=tight.domain_id).used_bytes == 30


def test_a_domain_without_room_for_all_its_copies_gets_those_that_fit_in_order(make_mailbox):
    first = make_mailbox("first@small.test")
    second = make_mailbox("second@small.test")
    elsewhere = make_mailbox("elsewhere@example.test")
    Domain.objects.filter(pk=first.domain_id).update(quota_bytes=25)
    body = b"x" * 8 + b"\r\n"
    with transaction.atomic():
        stored = store.append_messages_in_group(
            [group_copy(m, body) for m in (first, elsewhere, second, first)]
        )

    assert [s is not None for s in stored] == [True, True, True, False]
    # The domain's charge for all three copies was refused and undone, UIDs included; then each
    # copy was charged on its own: the third no longer fit, and its UID stays used.
    assert counters(first) == (10, 1, 3)
    assert counters(second) == (10, 1, 2)
    assert counters(elsewhere) == (10, 1, 2)
    assert Domain.objects.get(pk=first.domain_id).used_bytes == 20
    assert Domain.objects.get(pk=elsewhere.domain_id).used_bytes == 10


def test_a_groups_chunks_are_cut_exactly_and_written_a_chunks_worth_of_bytes_per_statement(
    make_mailbox, settings
):
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 64
    mailbox = make_mailbox()
    bodies = [b"a" * 38 + b"\r\n", b"b" * 148 + b"\r\n", b"c" * 28 + b"\r\n"]
    with transaction.atomic(), statements() as seen:
        stored = store.append_messages_in_group([group_copy(mailbox, body) for body in bodies])

    chunks = [
        list(MessageChunk.objects.filter(message_id=s.message_id).order_by("seq").values_list("seq", "data"))
        for s in stored
    ]
    assert [[(seq, len(data)) for seq, data in message] for message in chunks] == [
        [(0, 40)],
        [(0, 64), (1, 64), (2, 22)],
        [(0, 30)],
    ]
    assert [b"".join(bytes(data) for _, data in message) for message in chunks] == bodies
    # 40 + 64 bytes, then 64, then 22 + 30 at the end
    assert seen.count(f"INSERT INTO {table(MessageChunk)}") == 3


SENDER = "s@remote.test"


def test_a_domain_found_full_when_charged_last_gets_the_group_again_domain_first(make_mailbox, settings):
    """Room for two of three copies when small.test's charge comes, last: the group is rolled
    back and stored again charging each domain with its mailbox, which refuses the third; the
    copy to the other domain is stored all the same."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    addresses = ["a@small.test", "b@small.test", "c@small.test", "d@roomy.test"]
    for address in addresses:
        make_mailbox(address)
    message = spool_message([b"Subject: s\r\n\r\nbody\r\n"])
    size = len(trace_headers(SENDER, addresses[0])) + message.size_bytes
    Domain.objects.filter(name="small.test").update(quota_bytes=2 * size + size // 2)

    with statements() as seen:
        results = deliver_group([Delivery([recipient(address) for address in addresses], message, SENDER)])

    assert [(result.recipient, result.status) for result in results[0]] == [
        ("a@small.test", DeliveryStatus.DELIVERED),
        ("b@small.test", DeliveryStatus.DELIVERED),
        ("c@small.test", DeliveryStatus.OVER_QUOTA),
        ("d@roomy.test", DeliveryStatus.DELIVERED),
    ]
    domain_charges = [n for n, statement in enumerate(seen) if statement == f"UPDATE {table(Domain)}"]
    written_before = [
        statement for statement in seen[: domain_charges[0]] if not statement.startswith("SELECT")
    ]
    assert written_before[-1] == f"INSERT INTO {table(MessageChunk)}"  # first attempt: domains last
    # Then once more: both domains together (small.test refused), and small.test's copies one by one.
    assert len(domain_charges) == 1 + 1 + 3
    assert seen.count(f"INSERT INTO {table(Message)}") == 2
    assert Domain.objects.get(name="small.test").used_bytes == 2 * size
    assert (
        Domain.objects.get(name="roomy.test").used_bytes
        == Message.objects.get(mailbox__user__username="d@roomy.test").size_bytes
    )
    assert [Message.objects.filter(mailbox__user__username=a).count() for a in addresses] == [1, 1, 0, 1]
    assert [
        (mailbox.used_bytes, mailbox.used_messages) for mailbox in Mailbox.objects.order_by("user__username")
    ][:3] == [(size, 1), (size, 1), (0, 0)]
    assert sum(f.messages for f in DeliveryFigures.objects.filter(outcome=DeliveryFigures.DELIVERED)) == 3


def test_a_single_copy_to_a_full_domain_is_refused_and_charges_nothing(make_mailbox, settings):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    mailbox = make_mailbox("a@full.test")
    Domain.objects.filter(pk=mailbox.domain_id).update(quota_bytes=10)
    message = spool_message([b"Subject: s\r\n\r\nbody\r\n"])

    results = deliver_group([Delivery([recipient("a@full.test")], message, SENDER)])

    assert [result.status for result in results[0]] == [DeliveryStatus.OVER_QUOTA]
    assert Domain.objects.get(pk=mailbox.domain_id).used_bytes == 0
    mailbox.refresh_from_db()
    assert (mailbox.used_bytes, mailbox.used_messages, Message.objects.count()) == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "addresses", [["a@busy.test"], ["a@busy.test", "b@busy.test"]], ids=["one copy", "a group of copies"]
)
def test_the_domain_row_stays_unlocked_while_a_group_inserts_its_messages(
    make_mailbox, monkeypatch, settings, addresses
):
    """Every delivery to a domain charges the domain's row, which stays locked until the commit:
    charged last, it does not hold the domain's other deliveries back while the copies go in.
    (The message is larger than a chunk, so even alone it goes by the group's transaction. A
    smaller one alone is one statement, which holds the domain's row from its charge to its
    commit, all on the server: test_lone_copy.)"""
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's: SQLite has one writer at a time")
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 8
    mailbox = [make_mailbox(address) for address in addresses][0]
    seen_from_elsewhere: list[str] = []
    write_chunks = fastsql.write_chunks

    def lock_domain_from_another_connection() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT id FROM {table(Domain)} WHERE id = %s FOR UPDATE NOWAIT", [mailbox.domain_id]
                )
            seen_from_elsewhere.append("free")
        except OperationalError:
            seen_from_elsewhere.append("locked")
        finally:
            connection.close()

    def checking_the_domain_first(*args, **kwargs):
        elsewhere = threading.Thread(target=lock_domain_from_another_connection)
        elsewhere.start()
        elsewhere.join()
        return write_chunks(*args, **kwargs)

    monkeypatch.setattr(fastsql, "write_chunks", checking_the_domain_first)
    message = spool_message([b"Subject: s\r\n\r\nbody\r\n"])
    results = deliver_group([Delivery([recipient(address) for address in addresses], message, SENDER)])

    assert [result.status for result in results[0]] == [DeliveryStatus.DELIVERED] * len(addresses)
    assert seen_from_elsewhere == ["free"]
    stored = Message.objects.filter(mailbox__domain_id=mailbox.domain_id)
    assert stored.count() == len(addresses)
    assert Domain.objects.get(pk=mailbox.domain_id).used_bytes == sum(m.size_bytes for m in stored)


def test_an_alias_reaching_a_mailbox_full_at_rcpt_has_its_group_written_once(make_mailbox, settings):
    """A mailbox full at RCPT is kept in an alias's expansion, to be tried at commit, where its
    domain is likely still full: the group charges its domains first rather than writing
    everything, finding the domain full at the end, and writing it all again."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    make_mailbox("ann@ours.test")
    make_mailbox("bob@full.test")
    make_mailbox("carol@other.test")
    Domain.objects.filter(name="full.test").update(quota_bytes=10)
    aliases.create_alias(Actor.cli(), "team@ours.test", ["ann@ours.test", "bob@full.test"])
    message = spool_message([b"Subject: s\r\n\r\nbody\r\n"])
    team = look_up_recipient("team@ours.test", message.size_bytes)
    assert isinstance(team, Recipient) and not team.all_had_room

    with statements() as seen:
        results = deliver_group(
            [Delivery([recipient("carol@other.test")], message, SENDER), Delivery([team], message, SENDER)]
        )

    assert [[result.status for result in group] for group in results] == [
        [DeliveryStatus.DELIVERED],
        [DeliveryStatus.DELIVERED],  # through the alias: ann's copy; bob's is among its missed
    ]
    assert [r.recipient for r in results[1][0].missed] == ["bob@full.test"]
    assert seen.count(f"INSERT INTO {table(Message)}") == 1
    assert Message.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_deleting_a_mailbox_while_it_receives_a_message_waits_for_the_delivery(
    make_mailbox, monkeypatch, settings
):
    """delete_mailbox locks the mailbox before its domain, as a delivery does: it waits for the
    delivery's commit instead of holding the domain the delivery charges last (a deadlock).
    (The message is larger than a chunk, so stored by the group's transaction: test_lone_copy
    has the one statement's order.)"""
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's: SQLite has one writer at a time")
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 8
    make_mailbox("a@gone.test")
    deleted: dict[str, object] = {}
    deleter_pid: list[int] = []

    def delete() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                deleter_pid.append(cursor.fetchone()[0])
            deleted["messages"] = store.delete_mailbox("a@gone.test")
        except DatabaseError as error:
            deleted["error"] = error
        finally:
            connection.close()

    deleter = threading.Thread(target=delete)
    write_chunks = fastsql.write_chunks

    def delete_meanwhile(*args, **kwargs):
        deleter.start()
        for _ in range(600):  # until the deleter waits for a lock this delivery holds
            if deleter_pid and _waits_for_a_lock(deleter_pid[0]):
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the deletion never waited for the delivery")
        return write_chunks(*args, **kwargs)

    monkeypatch.setattr(fastsql, "write_chunks", delete_meanwhile)
    message = spool_message([b"Subject: s\r\n\r\nbody\r\n"])
    results = deliver_group([Delivery([recipient("a@gone.test")], message, SENDER)])
    deleter.join(timeout=60)

    assert [result.status for result in results[0]] == [DeliveryStatus.DELIVERED]
    assert deleted == {"messages": 1}
    assert Domain.objects.get(name="gone.test").used_bytes == 0
    assert Message.objects.count() == 0


def _waits_for_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.django_db(transaction=True)
def test_a_groups_row_locks_let_others_add_figures_for_the_locked_domain(make_mailbox):
    """The group's domain locks are the UPDATE's own strength (``FOR NO KEY UPDATE``): a row
    that refers to the domain (another group's figures) can still be inserted meanwhile. With
    ``FOR UPDATE`` that insert waited, and two groups each holding a domain could deadlock."""
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's: SQLite has one writer at a time")
    first, second = make_mailbox("a@locked.test"), make_mailbox("b@locked.test")
    inserted: list[str] = []

    def add_figures_elsewhere() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
                DeliveryFigures.objects.create(
                    hour=timezone.now().replace(minute=0, second=0, microsecond=0),
                    domain_id=first.domain_id,
                    outcome=DeliveryFigures.DELIVERED,
                    messages=1,
                )
            inserted.append("inserted")
        except OperationalError as error:
            inserted.append(type(error.__cause__).__name__)
        finally:
            connection.close()

    with transaction.atomic():
        store.lock_group([first, second])
        elsewhere = threading.Thread(target=add_figures_elsewhere)
        elsewhere.start()
        elsewhere.join()

    assert inserted == ["inserted"]
