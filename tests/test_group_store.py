"""The store's group append: a group's copies in a few statements, whatever their number, with the
results storing them one at a time would give."""

import re
from contextlib import contextmanager

import pytest
from django.db import connection, transaction

from mailadmin.hosting import store
from mailadmin.mailin.delivery import Delivery, Recipient, deliver_group, look_up_recipient
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import DeliveryFigures, Domain, Mailbox, Message, MessageChunk

pytestmark = pytest.mark.django_db


@contextmanager
def statements():
    """Every statement the connection executes meanwhile, as "UPDATE <table>", "SELECT <table>"...

    Through an execute wrapper, which also sees the chunk writes that DEBUG's query log leaves out.
    Savepoints are left out: inside the test's transaction they stand for the BEGIN and COMMIT
    of the group's own.
    """
    seen: list[str] = []

    def record(execute, sql, params, many, context):
        if not sql.startswith(("SAVEPOINT", "RELEASE SAVEPOINT")):
            seen.append(summary(sql))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield seen


def summary(sql: str) -> str:
    if selected := re.match(r'SELECT .*? FROM "?(\w+)', sql):
        return f"SELECT {selected[1]}"
    written = re.search(r'\b(UPDATE|INSERT INTO) "?(\w+)', sql)
    return f"{written[1]} {written[2]}"


def table(model: type) -> str:
    return model._meta.db_table


def recipient(address: str) -> Recipient:
    found = look_up_recipient(address)
    assert isinstance(found, Recipient), found
    return found


@pytest.mark.parametrize("messages", [2, 8, 32])
def test_a_group_to_3_mailboxes_in_2_domains_is_five_statements_whatever_its_size(
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
    # PostgreSQL first locks the group's mailboxes, then its domains, each in id order: see lock_group.
    row_locks = (
        [f"SELECT {table(Mailbox)}", f"SELECT {table(Domain)}"] if connection.vendor == "postgresql" else []
    )
    assert seen == [
        *row_locks,
        f"UPDATE {table(Mailbox)}",
        f"UPDATE {table(Domain)}",
        f"INSERT INTO {table(Message)}",
        f"INSERT INTO {table(MessageChunk)}",
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
