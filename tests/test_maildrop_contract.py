"""One contract, two maildrops: the in-memory reference and the ORM one runpop3 uses."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.db import InterfaceError, OperationalError

from mailadmin.executors import BoundedExecutor
from mailadmin.hosting import store
from mailadmin.mailin.delivery import deliver
from mailadmin.models import Mailbox, MaildropLease, Message, MessageChunk
from mailadmin.pop3d.leases import LeaseKeeper
from mailadmin.pop3d.maildrop import OrmMaildrop, snapshot
from pop3.mailbox import Maildrop, MaildropError, MemoryStore, MessageGone

MESSAGES = [
    b"Subject: one\r\n\r\nfirst body\r\n",
    b"Subject: two\r\n\r\n" + b"x" * 5000 + b"\r\n",
    b"Subject: three\r\n\r\n.dot line\r\n",
]


@dataclass
class Harness:
    open: Callable[[], Maildrop | None]  # a new session's maildrop, or None when locked
    stored: Callable[[], list[bytes]]  # what the mailbox holds now, in order
    add: Callable[[bytes], None]  # a delivery from outside the session
    steal_lock: Callable[[], None]  # another holder takes the lock over


def memory_harness() -> Harness:
    memory = MemoryStore([(f"uid{n}", data) for n, data in enumerate(MESSAGES)])
    owners = iter(range(100))

    def steal() -> None:
        memory.lock_owner = "thief"

    return Harness(
        open=lambda: memory.acquire(f"session-{next(owners)}"),
        stored=lambda: [data for _, data in memory.messages],
        add=lambda data: memory.messages.append((f"new{len(memory.messages)}", data)),
        steal_lock=steal,
    )


def orm_harness(make_mailbox) -> Harness:
    mailbox = make_mailbox("contract@example.test")
    for data in MESSAGES:
        deliver([mailbox.address], [data])
    # Trace headers differ per delivery; strip them so both harnesses hold the same bytes.
    prefix = len(b"Return-Path: <>\r\nDelivered-To: contract@example.test\r\n")
    executor = BoundedExecutor(2, "test-db")
    leases = LeaseKeeper(executor, node="test", ttl_seconds=60)

    def open_maildrop() -> Maildrop | None:
        lease = leases.lease(mailbox.pk)
        if not lease.acquire():
            return None
        return StrippedMaildrop(executor, lease, snapshot(mailbox.pk), prefix)

    def stored() -> list[bytes]:
        ids = Message.objects.for_maildrop(mailbox).values_list("pk", flat=True)
        return [b"".join(store.iter_message_bytes(pk))[prefix:] for pk in ids]

    def steal() -> None:
        MaildropLease.objects.filter(mailbox=mailbox).update(owner="thief")

    return Harness(
        open=open_maildrop,
        stored=stored,
        add=lambda data: deliver([mailbox.address], [data]),
        steal_lock=steal,
    )


class StrippedMaildrop(OrmMaildrop):
    """The ORM maildrop with the per-delivery trace headers cut off, for byte comparisons."""

    def __init__(self, executor, lease, rows, prefix: int) -> None:
        super().__init__(executor, lease, rows)
        self.prefix = prefix

    async def read(self, info):
        skip = self.prefix
        async for chunk in super().read(info):
            piece, skip = chunk[skip:], max(0, skip - len(chunk))
            if piece:
                yield piece


@pytest.fixture(params=["memory", pytest.param("orm", marks=pytest.mark.django_db(transaction=True))])
def harness(request, settings, make_mailbox) -> Harness:
    if request.param == "memory":
        return memory_harness()
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 1024  # several chunks for the 5 KB message
    return orm_harness(make_mailbox)


async def read_all(maildrop: Maildrop, number: int) -> bytes:
    return b"".join([chunk async for chunk in maildrop.read(maildrop.messages[number - 1])])


def contents(maildrop: Maildrop) -> list[bytes]:
    return [asyncio.run(read_all(maildrop, n)) for n in range(1, len(maildrop.messages) + 1)]


def test_snapshot_lists_every_message_in_delivery_order_with_exact_bytes(harness):
    maildrop = harness.open()
    assert contents(maildrop) == MESSAGES
    sizes = [info.size for info in maildrop.messages]
    prefix = getattr(maildrop, "prefix", 0)
    assert sizes == [len(data) + prefix for data in MESSAGES]
    assert len({info.uidl for info in maildrop.messages}) == 3


def test_a_second_session_cannot_open_a_locked_maildrop_until_release(harness):
    first = harness.open()
    assert harness.open() is None
    asyncio.run(first.release())
    second = harness.open()
    assert second is not None
    assert contents(second) == MESSAGES


def test_commit_removes_exactly_the_deleted_messages(harness):
    maildrop = harness.open()
    asyncio.run(maildrop.commit([maildrop.messages[0], maildrop.messages[2]]))
    asyncio.run(maildrop.release())
    assert harness.stored() == [MESSAGES[1]]


def test_release_without_commit_changes_nothing(harness):
    maildrop = harness.open()
    asyncio.run(maildrop.release())
    assert harness.stored() == MESSAGES


def test_snapshot_stays_fixed_while_mail_arrives(harness):
    maildrop = harness.open()
    harness.add(b"Subject: late\r\n\r\nlate\r\n")
    assert len(maildrop.messages) == 3
    assert contents(maildrop) == MESSAGES
    asyncio.run(maildrop.commit([maildrop.messages[0]]))
    asyncio.run(maildrop.release())
    assert len(harness.stored()) == 3
    assert harness.stored()[-1] == b"Subject: late\r\n\r\nlate\r\n"


def test_commit_after_the_lock_was_taken_over_fails_and_removes_nothing(harness):
    maildrop = harness.open()
    harness.steal_lock()
    with pytest.raises(MaildropError):
        asyncio.run(maildrop.commit([maildrop.messages[0]]))
    assert harness.stored() == MESSAGES


@pytest.mark.django_db(transaction=True)
def test_orm_commit_releases_quota_exactly(make_mailbox):
    harness = orm_harness(make_mailbox)
    before = Mailbox.objects.get(user__username="contract@example.test").used_bytes
    maildrop = harness.open()
    removed = maildrop.messages[1].size
    asyncio.run(maildrop.commit([maildrop.messages[1]]))
    mailbox = Mailbox.objects.get(user__username="contract@example.test")
    assert mailbox.used_bytes == before - removed
    assert mailbox.used_messages == 2


def unleased_maildrop(mailbox_id: int) -> OrmMaildrop:
    """An ORM maildrop over a snapshot, for reading only: no lease is taken."""
    executor = BoundedExecutor(1, "test-db")
    lease = LeaseKeeper(executor, node="test", ttl_seconds=60).lease(mailbox_id)
    return OrmMaildrop(executor, lease, snapshot(mailbox_id))


def counting(monkeypatch, name: str) -> list[tuple]:
    """Record the arguments of every call to ``store.<name>`` (still calling it)."""
    calls: list[tuple] = []
    real = getattr(store, name)

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(store, name, spy)
    return calls


@pytest.mark.django_db(transaction=True)
def test_orm_reads_first_chunks_ahead_in_one_query(make_mailbox, settings, monkeypatch):
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 1024
    mailbox = make_mailbox("ahead@example.test")
    bodies = [f"Subject: {n}\r\n\r\n{'y' * 200}\r\n".encode() for n in range(8)]
    bodies[5] = b"Subject: big\r\n\r\n" + b"z" * 40_000 + b"\r\n"  # 40 chunks
    for body in bodies:
        deliver([mailbox.address], [body])
    maildrop = unleased_maildrop(mailbox.pk)
    runs = counting(monkeypatch, "read_first_chunks")
    following = counting(monkeypatch, "read_chunks")

    read = [asyncio.run(read_all(maildrop, n)) for n in range(1, 9)]

    assert [data.endswith(body) for data, body in zip(read, bodies, strict=True)] == [True] * 8
    keys = [info.key for info in maildrop.messages]
    assert runs == [(keys,)]  # every first chunk, the big message's included, in one query
    # The rest of the big one: chunk 1 alone, then as many a query as 512 KiB hold.
    assert [(seq, count) for _, seq, count in following] == [(1, 1), (2, 38)]


class InlineExecutor(BoundedExecutor):
    """Runs each unit at once on the event loop's thread, so when each read starts is exact."""

    async def run(self, function, *args):
        return function(*args)


class ReadLog(list):
    """Every chunk query, as ("first", message numbers), ("ahead", message numbers) for a read
    ahead (no health check), or ("chunks", first seq, count), among the test's own entries, in
    order."""

    def watch(self, monkeypatch, maildrop: OrmMaildrop) -> None:
        numbers = {info.key: n for n, info in enumerate(maildrop.messages, start=1)}
        first_chunks, chunks = store.read_first_chunks, store.read_chunks

        def read_first_chunks(keys, health_check=True):
            self.append(("first" if health_check else "ahead", [numbers[key] for key in keys]))
            return first_chunks(keys, health_check)

        def read_chunks(key, first_seq, count):
            self.append(("chunks", first_seq, count))
            return chunks(key, first_seq, count)

        monkeypatch.setattr(store, "read_first_chunks", read_first_chunks)
        monkeypatch.setattr(store, "read_chunks", read_chunks)


@dataclass
class Inline:
    """A maildrop reading through the InlineExecutor, and the log of its queries."""

    mailbox: Mailbox
    monkeypatch: pytest.MonkeyPatch
    log: ReadLog

    def deliver(self, size: int, subject: str = "x") -> None:
        """A message of exactly ``size`` bytes, as stored (trace headers included)."""
        trace = len(f"Return-Path: <>\r\nDelivered-To: {self.mailbox.address}\r\n")
        head = f"Subject: {subject}\r\n\r\n".encode()
        # No two chunks alike (37 is prime to the chunk sizes): one sent out of order shows.
        filler = b"abcdefghijklmnopqrstuvwxyz0123456789 " * (size // 37 + 1)
        deliver([self.mailbox.address], [head + filler[: size - trace - len(head) - 2] + b"\r\n"])

    def open(self) -> OrmMaildrop:
        executor = InlineExecutor(1, "test-db")
        lease = LeaseKeeper(executor, node="test", ttl_seconds=60).lease(self.mailbox.pk)
        maildrop = OrmMaildrop(executor, lease, snapshot(self.mailbox.pk))
        self.log.watch(self.monkeypatch, maildrop)
        return maildrop


@pytest.fixture
def inline(monkeypatch, settings, make_mailbox) -> Inline:
    """Chunks of 1 KiB, batches of at most 1,000 bytes of first chunks."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # the InlineExecutor's queries
    settings.POP3_READAHEAD_BYTES = 1000
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 1024
    return Inline(make_mailbox("inline@example.test"), monkeypatch, ReadLog())


@pytest.fixture
def nine(inline) -> tuple[OrmMaildrop, ReadLog]:
    """Nine messages of 300 bytes: three to a batch."""
    for n in range(1, 10):
        inline.deliver(300, str(n))
    maildrop = inline.open()
    assert [info.size for info in maildrop.messages] == [300] * 9
    return maildrop, inline.log


async def retr_in_order(maildrop: OrmMaildrop, log: list, numbers) -> None:
    """What a client fetching in order causes: each message read whole, then a turn of the
    event loop (the client's round trip) before the next."""
    for number in numbers:
        data = await read_all(maildrop, number)
        log.append(("sent", number, len(data)))
        await asyncio.sleep(0)


@pytest.mark.django_db(transaction=True)
def test_orm_reads_the_next_batch_while_the_last_messages_are_sent(nine):
    maildrop, log = nine
    asyncio.run(retr_in_order(maildrop, log, range(1, 10)))
    assert log == [
        ("first", [1, 2, 3]),  # the one wait for the database: the first RETR
        ("sent", 1, 300),
        ("sent", 2, 300),
        ("ahead", [4, 5, 6]),  # under half a batch left: the next, before it is asked for
        ("sent", 3, 300),
        ("sent", 4, 300),
        ("sent", 5, 300),
        ("ahead", [7, 8, 9]),
        ("sent", 6, 300),
        ("sent", 7, 300),
        ("sent", 8, 300),
        ("sent", 9, 300),
    ]


@pytest.mark.django_db(transaction=True)
def test_orm_reads_from_where_a_client_jumps_to(nine):
    maildrop, log = nine
    asyncio.run(retr_in_order(maildrop, log, [1, 8, 2]))
    assert log == [
        ("first", [1, 2, 3]),
        ("sent", 1, 300),
        ("first", [8, 9]),
        ("sent", 8, 300),
        ("first", [2, 3, 4]),
        ("sent", 2, 300),
    ]


@pytest.mark.django_db(transaction=True)
def test_orm_release_abandons_the_batch_not_yet_read(nine):
    maildrop, log = nine

    async def two_then_quit() -> None:
        for number in (1, 2):
            await read_all(maildrop, number)  # the batch of 4-6 is asked for after 2...
        await maildrop.release()  # ...and the session ends before the loop got to it
        await asyncio.sleep(0)

    asyncio.run(two_then_quit())
    assert log == [("first", [1, 2, 3])]


@pytest.mark.django_db(transaction=True)
def test_orm_asks_for_the_next_chunk_while_the_last_is_sent(inline):
    inline.deliver(3000)  # chunks of 1024, 1024 and 952 bytes
    maildrop, log = inline.open(), inline.log

    async def send(lines: int | None) -> None:
        """As the session sends a reply: a chunk, then a turn while the transport drains."""
        reader = maildrop.read(maildrop.messages[0])
        try:
            while True:
                log.append("ask")
                chunk = await anext(reader, None)
                if chunk is None:
                    return
                log.append(("sent", len(chunk)))
                await asyncio.sleep(0)
                if lines is not None:
                    return  # TOP: the head was in the first chunk
        finally:
            await reader.aclose()

    asyncio.run(send(None))
    assert log == [
        "ask",
        ("first", [1]),
        ("sent", 1024),
        ("chunks", 1, 1),
        "ask",
        ("sent", 1024),
        ("chunks", 2, 1),
        "ask",
        ("sent", 952),
        "ask",
    ]
    log.clear()
    asyncio.run(send(lines=0))
    assert log == ["ask", ("first", [1]), ("sent", 1024), ("chunks", 1, 1)]  # read ahead, then dropped


def send_whole(maildrop: OrmMaildrop, log: list) -> bytes:
    """As the session sends a RETR: each chunk, then a turn while the transport drains."""

    async def send() -> bytes:
        sent = []
        async for chunk in maildrop.read(maildrop.messages[0]):
            log.append(("sent", len(chunk)))
            sent.append(chunk)
            await asyncio.sleep(0)
        return b"".join(sent)

    return asyncio.run(send())


def stored_bytes(maildrop: OrmMaildrop) -> bytes:
    return b"".join(store.iter_message_bytes(maildrop.messages[0].key))


# A message of 5,000 bytes in chunks of 1 KiB (four of 1,024 bytes and one of 904), read on
# two chunks a query at most: the read-ahead's 2,048 bytes.
READ_ON_IN_TWOS = [
    ("first", [1]),
    ("sent", 1024),
    ("chunks", 1, 1),  # while chunk 0 is sent: one chunk, all that a TOP might drop
    ("sent", 1024),
    ("chunks", 2, 2),  # while chunk 1 is sent: two
    ("sent", 1024),
    ("sent", 1024),
    ("chunks", 4, 1),  # while the last of those is sent: only what is left
    ("sent", 904),
]


@pytest.mark.django_db(transaction=True)
def test_orm_reads_on_as_many_chunks_as_the_read_ahead_holds_in_one_query(inline, settings):
    settings.POP3_READAHEAD_BYTES = 2048
    inline.deliver(5000)
    maildrop, log = inline.open(), inline.log
    assert send_whole(maildrop, log) == stored_bytes(maildrop)
    assert log == READ_ON_IN_TWOS


@pytest.mark.django_db(transaction=True)
def test_orm_reads_on_in_the_chunks_a_message_was_stored_with(inline, settings):
    settings.POP3_READAHEAD_BYTES = 2048
    inline.deliver(5000)  # in chunks of 1 KiB
    settings.MAILADMIN_CHUNK_SIZE_BYTES = 256  # then the setting changed
    maildrop, log = inline.open(), inline.log
    assert send_whole(maildrop, log) == stored_bytes(maildrop)
    assert log == READ_ON_IN_TWOS  # not eight chunks of 1 KiB a query


@pytest.mark.django_db(transaction=True)
def test_orm_reads_on_no_query_past_an_exact_multiple_of_a_chunk(inline, settings):
    settings.POP3_READAHEAD_BYTES = 4096
    inline.deliver(4096)  # four whole chunks
    maildrop, log = inline.open(), inline.log
    assert send_whole(maildrop, log) == stored_bytes(maildrop)
    assert log == [
        ("first", [1]),
        ("sent", 1024),
        ("chunks", 1, 1),
        ("sent", 1024),
        ("chunks", 2, 2),  # what is left: two, though four would fit
        ("sent", 1024),
        ("sent", 1024),
    ]


@pytest.mark.django_db(transaction=True)
def test_orm_a_message_of_one_chunk_is_not_read_on(inline):
    inline.deliver(1024)
    maildrop, log = inline.open(), inline.log
    assert send_whole(maildrop, log) == stored_bytes(maildrop)
    assert log == [("first", [1]), ("sent", 1024)]


@pytest.mark.django_db(transaction=True)
def test_orm_a_missing_chunk_ends_the_retr_with_message_gone_not_the_next_in_its_place(inline, settings):
    settings.POP3_READAHEAD_BYTES = 4096
    inline.deliver(5000)
    maildrop, log = inline.open(), inline.log
    MessageChunk.objects.filter(message_id=maildrop.messages[0].key, seq=3).delete()
    with pytest.raises(MessageGone, match="is gone"):
        send_whole(maildrop, log)
    assert log == [
        ("first", [1]),
        ("sent", 1024),
        ("chunks", 1, 1),
        ("sent", 1024),
        ("chunks", 2, 3),  # chunk 2, then none: 4 is not sent in 3's place
        ("sent", 1024),
    ]


@pytest.mark.django_db(transaction=True)
def test_orm_a_long_message_deleted_while_it_is_sent_raises_message_gone(inline, settings):
    settings.POP3_READAHEAD_BYTES = 2048
    inline.deliver(5000)
    maildrop, log = inline.open(), inline.log
    key = maildrop.messages[0].key

    async def send() -> None:
        async for chunk in maildrop.read(maildrop.messages[0]):
            log.append(("sent", len(chunk)))
            Message.objects.filter(pk=key).delete()  # before chunk 1 is read on
            await asyncio.sleep(0)

    with pytest.raises(MessageGone, match="is gone"):
        asyncio.run(send())
    assert log == [("first", [1]), ("sent", 1024), ("chunks", 1, 1)]


class FailingExecutor(InlineExecutor):
    """Fails the calls numbered in ``failing`` (from 1) as a database outage would."""

    def __init__(self, failing) -> None:
        super().__init__(1, "test-db")
        self.failing = failing
        self.calls = 0

    async def run(self, function, *args):
        self.calls += 1
        if self.calls in self.failing:
            raise OperationalError("the database went away")
        return await super().run(function, *args)


@pytest.mark.django_db(transaction=True)
def test_orm_a_failed_read_ahead_is_read_again_when_asked_for(nine):
    maildrop, log = nine
    maildrop.executor = FailingExecutor(failing={2})  # the read ahead of 4-6
    asyncio.run(retr_in_order(maildrop, log, range(1, 5)))
    assert log == [
        ("first", [1, 2, 3]),
        ("sent", 1, 300),
        ("sent", 2, 300),
        ("sent", 3, 300),
        ("first", [4, 5, 6]),  # read again, now
        ("sent", 4, 300),
    ]


@pytest.mark.django_db(transaction=True)
def test_orm_a_read_ahead_that_keeps_failing_fails_the_retr_that_needs_it(nine):
    maildrop, log = nine
    maildrop.executor = FailingExecutor(failing={2, 3})
    with pytest.raises(MaildropError, match="^the database went away$"):
        asyncio.run(retr_in_order(maildrop, log, range(1, 5)))
    assert log == [("first", [1, 2, 3]), ("sent", 1, 300), ("sent", 2, 300), ("sent", 3, 300)]


@pytest.mark.django_db(transaction=True)
def test_orm_a_failed_read_on_of_a_long_message_fails_its_retr(inline):
    inline.deliver(3000)
    maildrop, log = inline.open(), inline.log
    maildrop.executor = FailingExecutor(failing={2})  # chunk 1's read
    with pytest.raises(MaildropError, match="^the database went away$"):
        send_whole(maildrop, log)
    assert log == [("first", [1]), ("sent", 1024)]


@pytest.mark.django_db(transaction=True)
def test_orm_read_ahead_of_a_vanished_message_raises_message_gone(make_mailbox):
    mailbox = make_mailbox("gone@example.test")
    for n in range(3):
        deliver([mailbox.address], [f"Subject: {n}\r\n\r\nbody\r\n".encode()])
    maildrop = unleased_maildrop(mailbox.pk)
    Message.objects.filter(pk=maildrop.messages[1].key).delete()

    assert asyncio.run(read_all(maildrop, 1)).endswith(b"Subject: 0\r\n\r\nbody\r\n")
    with pytest.raises(MessageGone):
        asyncio.run(read_all(maildrop, 2))
    assert asyncio.run(read_all(maildrop, 3)).endswith(b"Subject: 2\r\n\r\nbody\r\n")


class ClosedConnectionExecutor(BoundedExecutor):
    async def run(self, function, *args):
        raise InterfaceError("connection already closed")


@pytest.mark.django_db(transaction=True)
def test_orm_read_on_a_closed_connection_is_a_maildrop_error(make_mailbox):
    mailbox = make_mailbox("closed@example.test")
    deliver([mailbox.address], [b"Subject: a\r\n\r\nbody\r\n"])
    executor = ClosedConnectionExecutor(1, "test-db")
    lease = LeaseKeeper(executor, node="test", ttl_seconds=60).lease(mailbox.pk)
    maildrop = OrmMaildrop(executor, lease, snapshot(mailbox.pk))
    with pytest.raises(MaildropError, match="^connection already closed$"):
        asyncio.run(read_all(maildrop, 1))
