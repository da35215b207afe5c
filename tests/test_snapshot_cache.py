"""Login snapshots of large mailboxes kept between sessions (``mailadmin.pop3d.snapshots``):
taken again only while the mailbox has not changed, on one database and across processes."""

import gc
import poplib

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from mailadmin.hosting import store
from mailadmin.mailin.delivery import deliver
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import Mailbox, Message, MessageChunk
from mailadmin.pop3d import maildrop
from mailadmin.pop3d.snapshots import SnapshotCache
from tests.pop3_server import running_pop3

PASSWORD = "correct horse"


def login_snapshot(cache: SnapshotCache, mailbox: Mailbox) -> tuple[list[str], int]:
    """The UIDLs a login would see, and the queries it took."""
    with CaptureQueriesContext(connection) as queries:
        messages = cache.snapshot(mailbox.pk, store.maildrop_version, maildrop._read_snapshot)
    return [message.uidl for message in messages], len(queries)


def uidls(mailbox: Mailbox) -> list[str]:
    return list(Message.objects.filter(mailbox=mailbox).order_by("pk").values_list("uidl", flat=True))


@pytest.fixture
def large(make_mailbox) -> Mailbox:
    """A mailbox of three messages, large for a cache whose minimum is three."""
    mailbox = make_mailbox("large@example.test")
    for n in range(3):
        deliver([mailbox.address], [b"Subject: %d\r\n\r\nbody\r\n" % n])
    return mailbox


@pytest.mark.django_db
def test_a_large_mailbox_unchanged_since_the_last_login_is_not_read_again(large):
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    first = login_snapshot(cache, large)
    assert first == (uidls(large), 1)  # seen to be large: its next login reads the version first
    assert login_snapshot(cache, large) == (uidls(large), 2)  # kept now
    assert login_snapshot(cache, large) == (uidls(large), 1)  # the version alone
    assert login_snapshot(cache, large) == (uidls(large), 1)
    assert cache.kept == 3


@pytest.mark.django_db
def test_a_delivery_or_a_deletion_since_the_last_login_is_seen(large):
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    login_snapshot(cache, large)
    login_snapshot(cache, large)
    deliver([large.address], [b"Subject: new\r\n\r\nbody\r\n"])
    after_delivery = login_snapshot(cache, large)
    assert after_delivery == (uidls(large), 2) and len(after_delivery[0]) == 4
    store.delete_messages(large, [Message.objects.filter(mailbox=large).order_by("pk").first().pk])
    after_deletion = login_snapshot(cache, large)
    assert after_deletion == (uidls(large), 2) and len(after_deletion[0]) == 3
    assert login_snapshot(cache, large) == (uidls(large), 1)


@pytest.mark.django_db
def test_an_import_below_next_uid_then_a_deletion_is_seen(large):
    """An imported message with its old UID (below next_uid) leaves next_uid where it was; with
    one deletion after it, next_uid and the message count were back where they had been."""
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    login_snapshot(cache, large)
    login_snapshot(cache, large)
    with spool_message([b"Subject: imported\r\n\r\nold\r\n"]) as message:
        store.append_message(large, message, uidl="imported-uidl", uid=1)
    store.delete_messages(large, [Message.objects.filter(mailbox=large).order_by("pk").first().pk])
    after = login_snapshot(cache, large)
    assert after == (uidls(large), 2) and "imported-uidl" in after[0]


@pytest.mark.django_db
def test_recalcquota_correcting_a_count_moves_the_version(large):
    Mailbox.objects.filter(pk=large.pk).update(used_messages=99)
    before = store.maildrop_version(large.pk)
    store.recalculate_quota()
    assert store.maildrop_version(large.pk) == (before[0], before[1] + 1)


@pytest.mark.django_db
def test_a_small_mailbox_is_read_at_every_login_without_a_version(make_mailbox):
    mailbox = make_mailbox("small@example.test")
    deliver([mailbox.address], [b"Subject: one\r\n\r\nbody\r\n"])
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    assert [login_snapshot(cache, mailbox)[1] for _ in range(3)] == [1, 1, 1]
    assert cache.kept == 0


def fake_mailboxes(versions: dict[int, tuple[int, int, int]], sizes: dict[int, int], reads: list):
    def read_version(mailbox_id: int):
        reads.append(("version", mailbox_id))
        return versions[mailbox_id]

    def read_messages(mailbox_id: int):
        reads.append(("messages", mailbox_id))
        return tuple(range(sizes[mailbox_id]))

    return read_version, read_messages


def test_a_mailbox_re_created_under_the_same_id_is_read_afresh():
    """Its uid_validity is new even when next_uid and the count came out the same."""
    reads: list = []
    versions, sizes = {7: (1000, 5, 4)}, {7: 4}
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    read_version, read_messages = fake_mailboxes(versions, sizes, reads)
    for _ in range(3):
        cache.snapshot(7, read_version, read_messages)
    versions[7] = (1001, 5, 4)
    cache.snapshot(7, read_version, read_messages)
    assert reads == [
        ("messages", 7),
        ("version", 7),
        ("messages", 7),
        ("version", 7),
        ("version", 7),
        ("messages", 7),
    ]


def test_the_least_recently_used_mailbox_goes_first_once_the_budget_is_spent():
    reads: list = []
    versions, sizes = {1: (1, 1, 4), 2: (2, 1, 4), 3: (3, 1, 3)}, {1: 4, 2: 4, 3: 3}
    cache = SnapshotCache(budget_messages=8, min_messages=3)
    read_version, read_messages = fake_mailboxes(versions, sizes, reads)
    for mailbox_id in (1, 1, 2, 2, 1):
        cache.snapshot(mailbox_id, read_version, read_messages)
    assert cache.kept == 8
    reads.clear()
    cache.snapshot(3, read_version, read_messages)  # seen large: remembered, nothing kept yet
    cache.snapshot(3, read_version, read_messages)  # kept: 2, used least lately, goes
    assert cache.kept == 7
    cache.snapshot(2, read_version, read_messages)
    cache.snapshot(1, read_version, read_messages)
    assert reads == [
        ("messages", 3),
        ("version", 3),
        ("messages", 3),
        ("messages", 2),  # 2 was let go, and is large only when seen so again
        ("version", 1),  # 1 is still kept
    ]


def test_a_mailbox_larger_than_the_budget_is_read_at_every_login():
    reads: list = []
    cache = SnapshotCache(budget_messages=3, min_messages=3)
    read_version, read_messages = fake_mailboxes({1: (1, 1)}, {1: 5}, reads)
    assert [len(cache.snapshot(1, read_version, read_messages)) for _ in range(4)] == [5] * 4
    assert reads == [("messages", 1)] + [("version", 1), ("messages", 1)] * 3
    assert cache.kept == 0


def test_a_mailbox_no_longer_large_is_forgotten():
    reads: list = []
    sizes = {1: 4}
    cache = SnapshotCache(budget_messages=100, min_messages=3)
    read_version, read_messages = fake_mailboxes({1: (1, 1)}, sizes, reads)
    cache.snapshot(1, read_version, read_messages)
    sizes[1] = 2
    for _ in range(3):
        cache.snapshot(1, read_version, read_messages)
    assert reads == [("messages", 1), ("version", 1), ("messages", 1), ("messages", 1), ("messages", 1)]


def test_a_budget_of_nothing_keeps_nothing_and_reads_no_version():
    reads: list = []
    cache = SnapshotCache(budget_messages=0, min_messages=3)
    read_version, read_messages = fake_mailboxes({1: (1, 1, 4)}, {1: 4}, reads)
    for _ in range(3):
        cache.snapshot(1, read_version, read_messages)
    assert reads == [("messages", 1)] * 3


def pop3_uidls(port: int, address: str) -> list[str]:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(address)
        client.pass_(PASSWORD)
        return [line.split()[1].decode() for line in client.uidl()[1]]
    finally:
        client.quit()


@pytest.mark.django_db(transaction=True)
def test_runpop3_keeps_a_snapshot_and_still_sees_what_another_process_changed(large, tmp_path):
    settings = {"POP3_SNAPSHOT_CACHE_MIN_MESSAGES": "3", "POP3_WORKERS": "1"}
    with running_pop3(tmp_path / "pop3", **settings) as server:
        port = server.port
        assert [pop3_uidls(port, large.address) for _ in range(3)] == [uidls(large)] * 3
        kept = uidls(large)
        gone = Message.objects.filter(mailbox=large).last().pk
        with connection.cursor() as cursor:  # behind the store's back: no version moves
            cursor.execute(f"DELETE FROM {MessageChunk._meta.db_table} WHERE message_id = %s", [gone])
            cursor.execute(f"DELETE FROM {Message._meta.db_table} WHERE id = %s", [gone])
        assert pop3_uidls(port, large.address) == kept  # so runpop3 served the snapshot it kept
        store.recalculate_quota()  # which notices the missing message
        assert pop3_uidls(port, large.address) == uidls(large) == kept[:-1]
        deliver([large.address], [b"Subject: new\r\n\r\nbody\r\n"])  # this process, not runpop3
        assert pop3_uidls(port, large.address) == uidls(large)
        store.delete_messages(large, [Message.objects.filter(mailbox=large).order_by("pk").first().pk])
        assert pop3_uidls(port, large.address) == uidls(large)
        assert len(uidls(large)) == 2


@pytest.mark.django_db
def test_a_snapshot_is_read_with_the_collector_paused(large, monkeypatch):
    seen = []
    real = store.maildrop_snapshot

    def spying(mailbox_id: int):
        seen.append(gc.isenabled())
        return real(mailbox_id)

    monkeypatch.setattr(store, "maildrop_snapshot", spying)
    assert [message.uidl for message in maildrop._read_snapshot(large.pk)] == uidls(large)
    assert (seen, gc.isenabled()) == ([False], True)
