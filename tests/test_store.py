"""Store and delivery rules: exact sizes, CRLF, UIDLs, counters, quota."""

import threading
from datetime import timedelta

import pytest
from django.db import DatabaseError, NotSupportedError, connection, transaction
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from mailadmin.hosting import services, store
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store import fastsql
from mailadmin.mailin import delivery as delivery_module
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    deliver,
    deliver_group,
    look_up_recipient,
    trace_headers,
)
from mailadmin.mailin.messagefile import normalise, spool_message, summarise_headers
from mailadmin.models import Domain, Mailbox, MaildropLease, Message, MessageChunk

pytestmark = pytest.mark.django_db


def stored_bytes(message_id: int) -> bytes:
    return b"".join(store.iter_message_bytes(message_id))


def assert_counters_exact(mailbox: Mailbox) -> None:
    mailbox.refresh_from_db()
    totals = Message.objects.filter(mailbox=mailbox).aggregate(size=Sum("size_bytes"))
    assert mailbox.used_bytes == (totals["size"] or 0)
    assert mailbox.used_messages == Message.objects.filter(mailbox=mailbox).count()
    domain_total = Message.objects.filter(mailbox__domain=mailbox.domain).aggregate(size=Sum("size_bytes"))
    assert Domain.objects.get(pk=mailbox.domain_id).used_bytes == (domain_total["size"] or 0)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        (b"a\r\n\nb", b"a\r\n\r\nb\r\n"),
        (b"no final newline", b"no final newline\r\n"),
        (b"", b""),
    ],
)
def test_line_endings_are_normalised_to_crlf(raw, normalised):
    assert normalise(raw) == normalised


def test_normaliser_handles_crlf_split_across_reads():
    pieces = [b"Subject: x\r", b"\n\r", b"\nbody\r", b"", b"\n"]
    with spool_message(pieces) as spooled:
        assert b"".join(spooled.chunks(4)) == b"Subject: x\r\n\r\nbody\r\n"
        assert spooled.header_size_bytes == len(b"Subject: x\r\n\r\n")


def test_delivery_stores_exact_crlf_bytes_with_trace_headers(make_mailbox):
    mailbox = make_mailbox("bob@example.test")
    [result] = deliver(
        ["Bob@Example.TEST"], [b"Subject: hi\nFrom: a@b.test\n\nline\n.\nend"], sender="a@b.test"
    )
    assert result.status is DeliveryStatus.DELIVERED
    message = Message.objects.get(mailbox=mailbox)
    expected = (
        b"Return-Path: <a@b.test>\r\nDelivered-To: bob@example.test\r\n"
        b"Subject: hi\r\nFrom: a@b.test\r\n\r\nline\r\n.\r\nend\r\n"
    )
    assert stored_bytes(message.pk) == expected
    assert message.size_bytes == len(expected) == 102
    assert message.uidl == result.uidl
    assert message.subject == "hi"
    assert message.from_header == "a@b.test"
    assert message.header_size_bytes == len(expected[: expected.index(b"\r\n\r\n") + 4]) == 88
    assert_counters_exact(mailbox)


def test_trace_headers_cannot_inject_lines():
    assert trace_headers("evil\r\nX-Injected: 1", "bob@example.test") == (
        b"Return-Path: <evilX-Injected:1>\r\nDelivered-To: bob@example.test\r\n"
    )


def test_large_message_is_cut_into_chunks_of_the_configured_size(make_mailbox, settings):
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 1000
    mailbox = make_mailbox()
    body = b"".join(b"line %05d\r\n" % n for n in range(500))
    [result] = deliver([mailbox.address], [body])
    message = Message.objects.get(uidl=result.uidl)
    sizes = list(MessageChunk.objects.filter(message=message).order_by("seq").values_list("data", flat=True))
    assert [len(chunk) for chunk in sizes[:-1]] == [1000] * (len(sizes) - 1)
    assert stored_bytes(message.pk).endswith(body)
    assert message.size_bytes == len(body) + len(trace_headers("", mailbox.address))


def test_chunks_are_compressed_with_lz4_on_postgresql(make_mailbox):
    """pglz cost four times lz4's CPU per MB delivered (migration 0017); SQLite stores as it is."""
    if connection.vendor != "postgresql":
        pytest.skip("column compression is PostgreSQL's")
    if not _server_has_lz4():
        pytest.skip("this PostgreSQL server was built without lz4: chunks stay with pglz")
    mailbox = make_mailbox()
    body = b"".join(b"line %05d of compressible text\r\n" % n for n in range(2000))
    [result] = deliver([mailbox.address], [body])
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pg_column_compression(data), octet_length(data) FROM {MessageChunk._meta.db_table} "
            "WHERE message_id = %s",
            [Message.objects.get(uidl=result.uidl).pk],
        )
        assert cursor.fetchall() == [("lz4", len(body) + len(trace_headers("", mailbox.address)))]


def _server_has_lz4() -> bool:
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("CREATE TEMPORARY TABLE lz4_probe (data bytea COMPRESSION lz4)")
            transaction.set_rollback(True)
    except NotSupportedError:
        return False
    return True


def test_uidls_are_unique_and_never_reused_after_deletion(make_mailbox):
    mailbox = make_mailbox()
    first = [deliver([mailbox.address], [b"m%d\r\n" % n])[0].uidl for n in range(3)]
    store.delete_messages(mailbox, Message.objects.filter(mailbox=mailbox).values_list("pk", flat=True))
    later = deliver([mailbox.address], [b"again\r\n"])[0].uidl
    mailbox.refresh_from_db()
    assert len(set(first)) == 3
    assert later not in first
    assert later == store.format_uidl(4, mailbox.uid_validity)
    assert first[0] == store.format_uidl(1, mailbox.uid_validity)
    assert_counters_exact(mailbox)


def test_counters_track_every_delivery_and_deletion(make_mailbox):
    mailbox = make_mailbox()
    for size in (10, 200, 3000):
        deliver([mailbox.address], [b"x" * size])
        assert_counters_exact(mailbox)
    ids = list(Message.objects.for_maildrop(mailbox).values_list("pk", flat=True))
    assert store.delete_messages(mailbox, ids[:2]) == (
        2,
        10 + 200 + 2 * len(trace_headers("", mailbox.address)) + 4,
    )
    assert_counters_exact(mailbox)
    assert store.delete_messages(mailbox, ids[:2]) == (0, 0)
    assert MessageChunk.objects.filter(message_id__in=ids[:2]).count() == 0
    assert_counters_exact(mailbox)


def test_mailbox_quota_refuses_the_message_that_would_not_fit(make_mailbox, settings):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    overhead = len(trace_headers("", "q@example.test"))
    mailbox = make_mailbox("q@example.test", quota_bytes=2 * (overhead + 100))
    results = [deliver([mailbox.address], [b"y" * 98])[0].status for _ in range(3)]
    assert results == [DeliveryStatus.DELIVERED, DeliveryStatus.DELIVERED, DeliveryStatus.OVER_QUOTA]
    mailbox.refresh_from_db()
    assert mailbox.used_bytes == mailbox.quota_bytes
    assert Message.objects.filter(mailbox=mailbox).count() == 2
    assert_counters_exact(mailbox)


def test_message_count_quota(make_mailbox):
    mailbox = make_mailbox(quota_messages=1)
    assert [deliver([mailbox.address], [b"a"])[0].status for _ in range(2)] == [
        DeliveryStatus.DELIVERED,
        DeliveryStatus.OVER_QUOTA,
    ]


def test_domain_quota_caps_total_usage_across_mailboxes(make_mailbox):
    a = make_mailbox("a@cap.test")
    b = make_mailbox("b@cap.test")
    Domain.objects.filter(name="cap.test").update(quota_bytes=300)
    assert deliver([a.address], [b"x" * 200])[0].status is DeliveryStatus.DELIVERED
    assert deliver([b.address], [b"x" * 200])[0].status is DeliveryStatus.OVER_QUOTA
    assert Message.objects.filter(mailbox=b).count() == 0
    assert_counters_exact(b)
    assert_counters_exact(a)


def test_per_recipient_results(make_mailbox):
    good = make_mailbox("good@example.test")
    off = make_mailbox("off@example.test")
    store.update_mailbox_settings(off.pk, {"active": False})
    full = make_mailbox("full@example.test", quota_bytes=10)
    results = deliver(
        ["good@example.test", "nobody@example.test", "off@example.test", full.address, "bad"], [b"hi"]
    )
    assert [r.status for r in results] == [
        DeliveryStatus.DELIVERED,
        DeliveryStatus.NO_SUCH_MAILBOX,
        DeliveryStatus.MAILBOX_INACTIVE,
        DeliveryStatus.OVER_QUOTA,
        DeliveryStatus.NO_SUCH_MAILBOX,
    ]
    assert Message.objects.filter(mailbox=good).count() == 1


def test_all_or_none_stores_nothing_when_one_recipient_fails(make_mailbox):
    good = make_mailbox("good@example.test")
    results = deliver([good.address, "nobody@example.test"], [b"hi"], all_or_none=True)
    assert [r.status for r in results] == [DeliveryStatus.NOT_ATTEMPTED, DeliveryStatus.NO_SUCH_MAILBOX]
    assert Message.objects.count() == 0
    assert_counters_exact(good)


def test_message_too_large_is_refused_for_every_recipient(make_mailbox, settings):
    settings.MAILADMIN_MAX_MESSAGE_SIZE_BYTES = 1000
    mailbox = make_mailbox()
    results = deliver([mailbox.address, mailbox.address], [b"z" * 999, b"\n"])
    assert [r.status for r in results] == [DeliveryStatus.TOO_LARGE] * 2
    assert deliver([mailbox.address], [b"z" * 998])[0].status is DeliveryStatus.DELIVERED


def test_deleting_a_mailbox_releases_domain_usage(make_mailbox):
    a = make_mailbox("a@example.test")
    b = make_mailbox("b@example.test")
    deliver([a.address], [b"x" * 100])
    deliver([b.address], [b"x" * 50])
    assert store.delete_mailbox(a.address) == 1
    assert Message.objects.count() == 1
    assert_counters_exact(b)


def test_recalculate_quota_reports_and_fixes_drift(make_mailbox):
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"x" * 100])
    Mailbox.objects.filter(pk=mailbox.pk).update(used_bytes=7, used_messages=9)
    drifts = store.recalculate_quota(mailbox.address)
    mailbox.refresh_from_db()
    size = Message.objects.get().size_bytes
    assert [(d.subject, d.counter, d.recorded, d.actual) for d in drifts] == [
        ("alice@example.test", "used_bytes", 7, size),
        ("alice@example.test", "used_messages", 9, 1),
    ]
    assert store.recalculate_quota() == []
    assert_counters_exact(mailbox)


def warnings_in(mailbox: Mailbox) -> list[str]:
    return list(
        Message.objects.for_maildrop(mailbox)
        .filter(subject__contains="% full")
        .values_list("subject", flat=True)
    )


def test_crossing_80_then_95_percent_delivers_exactly_two_warnings(make_mailbox):
    mailbox = make_mailbox("w@example.test", quota_bytes=100_000)
    body = b"x" * 9_900  # with trace headers, each delivery is just under 10 % of the quota
    statuses = [deliver([mailbox.address], [body])[0].status for _ in range(9)]
    assert statuses == [DeliveryStatus.DELIVERED] * 9
    assert warnings_in(mailbox) == ["Your mailbox is 80% full"]
    deliver([mailbox.address], [b"y" * 5_500])  # now past 95 % (the warning itself counts too)
    assert warnings_in(mailbox) == ["Your mailbox is 80% full", "Your mailbox is 95% full"]
    mailbox.refresh_from_db()
    assert mailbox.quota_warning_percent == 95
    deliver([mailbox.address], [b"z"])  # staying above does not repeat the warning
    assert len(warnings_in(mailbox)) == 2
    warning = Message.objects.filter(mailbox=mailbox, subject="Your mailbox is 95% full").get()
    text = stored_bytes(warning.pk).decode()
    assert "From: postmaster@example.test\r\n" in text
    assert "Your mailbox w@example.test uses" in text
    assert_counters_exact(mailbox)


def test_a_quota_warning_that_fails_leaves_the_delivery_answered_as_stored(make_mailbox, monkeypatch):
    """The warning comes after the commit: an error in it must not turn a stored copy into a
    temporary failure, which the MTA would answer by delivering the message again."""
    mailbox = make_mailbox("broken@example.test", quota_bytes=1_000)

    def failing_warning(*args) -> None:
        raise RuntimeError("the warning's template is broken")

    monkeypatch.setattr(delivery_module, "_deliver_warning", failing_warning)
    [result] = deliver([mailbox.address], [b"x" * 900])
    assert result.status is DeliveryStatus.DELIVERED
    assert Message.objects.filter(mailbox=mailbox).count() == 1
    mailbox.refresh_from_db()
    assert mailbox.quota_warning_percent == 95  # marked, so the next delivery does not try again


def test_a_warning_repeats_after_usage_falls_and_crosses_again(make_mailbox):
    mailbox = make_mailbox("again@example.test", quota_bytes=10_000)
    Domain.objects.filter(name="example.test").update(quota_warning_percents="50")
    deliver([mailbox.address], [b"x" * 6000])
    assert warnings_in(mailbox) == ["Your mailbox is 50% full"]
    store.delete_messages(mailbox, Message.objects.filter(mailbox=mailbox).values_list("pk", flat=True))
    deliver([mailbox.address], [b"small"])
    mailbox.refresh_from_db()
    assert mailbox.quota_warning_percent == 0
    deliver([mailbox.address], [b"x" * 6000])
    assert warnings_in(mailbox) == ["Your mailbox is 50% full"]
    assert Message.objects.filter(mailbox=mailbox).count() == 3


def test_find_mailbox_loads_what_the_orm_loads(make_mailbox):
    make_mailbox("other@example.test")
    created = make_mailbox("found@example.test", quota_bytes=5000)
    deliver([created.address], [b"Subject: x\r\n\r\nbody\r\n"])
    services.update_mailbox(Actor.cli(), created.address, active=False)
    expected = Mailbox.objects.select_related("user", "domain").get(pk=created.pk)

    found = store.find_mailbox("found@example.test")

    assert (found.pk, found.address, found.domain.name) == (created.pk, "found@example.test", "example.test")
    for model_instance, loaded in [
        (expected, found),
        (expected.user, found.user),
        (expected.domain, found.domain),
    ]:
        fields = type(loaded)._meta.concrete_fields
        assert [getattr(loaded, f.attname) for f in fields] == [
            getattr(model_instance, f.attname) for f in fields
        ]
    assert found.active is False and found.user.is_active is True  # booleans, not SQLite's 0/1
    assert found.created_at.tzinfo is not None
    assert found.used_bytes == expected.used_bytes > 0
    assert store.find_mailbox("nobody@example.test") is None


@pytest.mark.django_db(transaction=True)
def test_find_mailbox_converts_on_another_threads_connection_with_the_converters_found_once(make_mailbox):
    """The look-up's converters are found once, on the first thread's connection, and serve the
    daemons' other threads' connections."""
    make_mailbox("found@example.test")
    store.find_mailbox("found@example.test")  # the look-up built here
    found: list = []

    def look_up() -> None:
        found.append(store.find_mailbox("found@example.test"))
        connection.close()

    thread = threading.Thread(target=look_up)
    thread.start()
    thread.join()
    (mailbox,) = found
    expected = Mailbox.objects.select_related("user", "domain").get(pk=mailbox.pk)
    assert (mailbox.created_at, mailbox.active, mailbox.user.date_joined) == (
        expected.created_at,
        True,
        expected.user.date_joined,
    )
    assert mailbox.created_at.tzinfo is not None  # converted, not SQLite's text


@pytest.mark.parametrize(
    ("headers", "subject", "sender"),
    [
        (b"Subject: plain\r\nFrom: A <a@b.test>\r\n\r\n", "plain", "A <a@b.test>"),
        (
            b"Subject: =?utf-8?q?caf=C3=A9?= ok\r\nFrom: =?iso-8859-1?q?J=F6rg?= <j@x>\r\n",
            "café ok",
            "Jörg <j@x>",
        ),
        ("Subject: raw café\r\nFrom: Jörg <j@x>\r\n".encode(), "raw café", "Jörg <j@x>"),
        (b"Subject: folded\r\n  line two\r\n\r\n", "folded line two", ""),
        (b"Subject: bad \xff bytes\r\n\r\n", "bad \ufffd bytes", ""),
        (b"Subject: =?utf-8?b?!!!notbase64?=\r\nFrom: x@y\r\n", "=?utf-8?b?!!!notbase64?=", "x@y"),
        (b"Subject: =?no-such-charset?q?abc?=\r\n", "abc", ""),
        (b"no header block at all", "", ""),
    ],
)
def test_header_summary_decodes_subject_and_from(headers, subject, sender):
    summary = summarise_headers(headers)
    assert (summary.subject, summary.from_header) == (subject, sender)


def group_delivery(address: str, body: bytes) -> Delivery:
    found = look_up_recipient(address)
    assert isinstance(found, Recipient), found
    return Delivery([found], spool_message([body]), "s@remote.test")


def test_a_group_stores_what_fits_refuses_the_rest_and_keeps_every_counter_exact(make_mailbox, settings):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""  # no warnings among the counted messages
    body = b"Subject: group\r\n\r\n" + b"g" * 300 + b"\r\n"
    size = len(trace_headers("s@remote.test", "roomy@example.test")) + len(body)
    roomy = make_mailbox("roomy@example.test")
    tight = make_mailbox("tight@example.test", quota_bytes=size + 10)
    other = make_mailbox("other@small.test")
    Domain.objects.filter(name="small.test").update(quota_bytes=100)
    deliveries = [
        group_delivery("roomy@example.test", body),
        group_delivery("tight@example.test", body),
        group_delivery("tight@example.test", body),  # the second copy no longer fits
        group_delivery("other@small.test", body),  # the mailbox fits, its domain does not
    ]

    results = deliver_group(deliveries)

    assert [[r.status for r in result] for result in results] == [
        [DeliveryStatus.DELIVERED],
        [DeliveryStatus.DELIVERED],
        [DeliveryStatus.OVER_QUOTA],
        [DeliveryStatus.OVER_QUOTA],
    ]
    for mailbox in (roomy, tight, other):
        assert_counters_exact(mailbox)
    assert Message.objects.filter(mailbox=tight).count() == 1
    assert Message.objects.filter(mailbox=other).count() == 0
    other.refresh_from_db()
    assert other.next_uid == 2  # the refused copy's UID stays used


def test_a_group_that_fails_in_the_database_stores_none_of_its_messages(make_mailbox, monkeypatch):
    make_mailbox("first@example.test")
    make_mailbox("second@example.test")
    deliveries = [
        group_delivery("first@example.test", b"Subject: 1\r\n\r\none\r\n"),
        group_delivery("second@example.test", b"Subject: 2\r\n\r\ntwo\r\n"),
    ]
    real_write = fastsql.write_chunks

    def write_then_fail(messages):  # the group's last write: every row and counter is in by now
        real_write(messages)
        raise DatabaseError("disk I/O error")

    monkeypatch.setattr(fastsql, "write_chunks", write_then_fail)
    with pytest.raises(DatabaseError):
        deliver_group(deliveries)
    assert Message.objects.count() == 0
    assert list(Mailbox.objects.values_list("used_bytes", "used_messages", "next_uid")) == [(0, 0, 1)] * 2
    assert Domain.objects.get(name="example.test").used_bytes == 0


def test_the_quota_warning_mark_is_raised_once_and_lowered_by_the_store(make_mailbox):
    mailbox = make_mailbox()
    assert store.mark_quota_warning(mailbox.pk, 80) is True
    assert store.mark_quota_warning(mailbox.pk, 80) is False  # a second crossing sends nothing
    assert store.mark_quota_warning(mailbox.pk, 0) is False  # mail deleted: the mark falls
    assert Mailbox.objects.get(pk=mailbox.pk).quota_warning_percent == 0
    assert store.mark_quota_warning(mailbox.pk, 95) is True
    assert Mailbox.objects.get(pk=mailbox.pk).quota_warning_percent == 95


@pytest.mark.django_db(transaction=True)
def test_taking_and_giving_back_a_lease_commit_without_waiting_for_the_disk(make_mailbox, commit_durability):
    mailbox = make_mailbox()
    levels = commit_durability
    levels.clear()  # the mailbox's own commits
    assert store.acquire_lease(mailbox.pk, "owner-1", "node", 60)
    store.release_lease("owner-1")
    deliver([mailbox.address], [b"Subject: after\r\n\r\nbody\r\n"])  # mail stays durable
    assert not MaildropLease.objects.exists()
    if connection.vendor == "postgresql":
        assert levels == ["off", "off", "on"]
    else:
        assert levels == ["1", "1", "flushed"]


def lease_statements(queries: CaptureQueriesContext) -> list[str]:
    """The statements on the lease table, without the transaction's and durability's own."""
    return [query["sql"].split()[0] for query in queries.captured_queries if "maildroplease" in query["sql"]]


@pytest.mark.django_db(transaction=True)
def test_a_lease_is_taken_new_or_lapsed_and_refused_live_in_one_statement_each(make_mailbox):
    mailbox = make_mailbox()
    with CaptureQueriesContext(connection) as queries:
        assert store.acquire_lease(mailbox.pk, "first", "node-a", 60)
        assert not store.acquire_lease(mailbox.pk, "second", "node-b", 60)
    assert lease_statements(queries) == ["INSERT", "INSERT"]
    assert list(MaildropLease.objects.values_list("owner", "node")) == [("first", "node-a")]

    MaildropLease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    with CaptureQueriesContext(connection) as queries:
        assert store.acquire_lease(mailbox.pk, "second", "node-b", 60)
        store.release_lease("first")  # the old holder's late release leaves the new lease alone
    assert lease_statements(queries) == ["INSERT", "DELETE"]
    lease = MaildropLease.objects.get()
    assert (lease.owner, lease.node) == ("second", "node-b")
    assert timedelta(seconds=59) < lease.expires_at - lease.acquired_at <= timedelta(seconds=60)
