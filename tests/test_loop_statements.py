"""runlmtp's two statements of a plain delivery sent from its event loop (PostgreSQL,
``store.LoopStatements``): the same answers and rows as the database threads give, and whatever
the loop cannot answer for certain left to the threads, with nothing written."""

import asyncio
from types import SimpleNamespace

import psycopg
import pytest

from mailadmin.hosting import figures, store
from mailadmin.hosting.store import fastsql, loopsql
from mailadmin.mailin import delivery
from mailadmin.mailin.delivery import Delivery, DeliveryStatus, Recipient, deliver_group, look_up_recipient
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import DeliveryFigures, Domain, Mailbox, Message
from tests.test_lone_copy import BODY, SENDER, counters, statements

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def postgresql_only(settings):
    if not fastsql.stores_lone_copies():
        pytest.skip("the loop's statements are PostgreSQL's")
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""


def on_the_loop(work, connections_at_most: int = 2):
    """``await work(statements)`` on a new event loop, with its statements open and connected."""

    async def run():
        statements = loopsql.LoopStatements(connections_at_most)
        await statements.open(wait=True)
        try:
            return await work(statements)
        finally:
            await statements.close()

    return asyncio.run(run())


def recipient(address: str) -> Recipient:
    found = look_up_recipient(address)
    assert isinstance(found, Recipient), found
    return found


def one_delivery(address: str, body: bytes = BODY) -> Delivery:
    return Delivery([recipient(address)], spool_message([body]), SENDER)


async def no_thread(*_args):
    raise AssertionError("nothing should go to a database thread")


def stored_on_the_loop(deliveries, tally=None, in_a_thread=no_thread):
    return on_the_loop(
        lambda statements: delivery.stored_alone_on_the_loop(deliveries, tally, statements, in_a_thread)
    )


def first_uidl(address: str) -> str:
    return store.format_uidl(1, Mailbox.objects.get(user__username=address).uid_validity)


def summary(results) -> list[list[tuple[DeliveryStatus, str | None]]]:
    return [[(result.status, result.uidl) for result in group] for group in results]


# --- RCPT ---------------------------------------------------------------------------------------


def test_the_loops_look_up_answers_as_the_threads_do(make_mailbox):
    make_mailbox("ann@loop.test")
    make_mailbox("full@loop.test", quota_bytes=10)

    async def look_up(statements):
        return [
            await delivery.look_up_recipient_on_the_loop(address, 100, statements)
            for address in ("Ann@Loop.test", "full@loop.test", "nobody@loop.test", "not an address")
        ]

    ann, full, unknown, invalid = on_the_loop(look_up)
    threads = look_up_recipient("Ann@Loop.test", 100)
    assert (ann.address, [m.pk for m in ann.mailboxes], ann.all_had_room) == (
        threads.address,
        [m.pk for m in threads.mailboxes],
        True,
    )
    assert ann.mailboxes[0].user.username == "ann@loop.test"
    assert ann.mailboxes[0].domain.name == "loop.test"
    assert full is DeliveryStatus.OVER_QUOTA == look_up_recipient("full@loop.test", 100)
    assert unknown is None  # no mailbox: an alias, or nothing, is the threads' to say
    assert invalid is DeliveryStatus.NO_SUCH_MAILBOX


def test_a_look_up_without_a_connection_is_left_to_the_threads(make_mailbox, monkeypatch):
    make_mailbox("ann@loop.test")
    monkeypatch.setattr(loopsql, "CONNECTION_WAIT_SECONDS", 0.2)

    async def look_up():
        statements = loopsql.LoopStatements(1)
        statements._pool.kwargs = {**statements._pool.kwargs, "port": 1}  # nothing listens there
        await statements.open()
        try:
            return await delivery.look_up_recipient_on_the_loop("ann@loop.test", 100, statements)
        finally:
            await statements.close()

    assert asyncio.run(look_up()) is None


# --- The lone copy ------------------------------------------------------------------------------


def test_a_lone_copy_from_the_loop_writes_what_the_threads_write(make_mailbox):
    make_mailbox("ann@loop.test")
    make_mailbox("bob@loop.test")

    to_ann = [one_delivery("ann@loop.test")]
    with statements() as seen:
        from_loop = stored_on_the_loop(to_ann)
    from_threads = deliver_group([one_delivery("bob@loop.test")])

    assert seen == []  # Django's connection sent nothing: the loop's did
    assert summary(from_loop) == [[(DeliveryStatus.DELIVERED, first_uidl("ann@loop.test"))]]
    assert summary(from_threads) == [[(DeliveryStatus.DELIVERED, first_uidl("bob@loop.test"))]]
    assert counters("ann@loop.test")[:3] == counters("bob@loop.test")[:3]
    ann, bob = (Message.objects.get(mailbox__user__username=a) for a in ("ann@loop.test", "bob@loop.test"))
    assert (
        (ann.size_bytes, ann.subject, ann.from_header, ann.envelope_sender)
        == (
            bob.size_bytes,
            bob.subject,
            bob.from_header,
            bob.envelope_sender,
        )
        == (ann.size_bytes, "alone", "Ann <ann@remote.test>", SENDER)
    )
    assert b"".join(store.iter_message_bytes(ann.pk)).replace(b"To: ann@loop", b"To: bob@loop") == b"".join(
        store.iter_message_bytes(bob.pk)
    )
    delivered = DeliveryFigures.objects.get(outcome=DeliveryFigures.DELIVERED)
    assert (delivered.messages, delivered.size_bytes) == (2, ann.size_bytes + bob.size_bytes)


@pytest.mark.parametrize("case", ["two deliveries", "refusals waiting", "larger than a chunk"])
def test_what_is_no_lone_copy_is_left_to_the_threads_with_nothing_written(make_mailbox, settings, case):
    make_mailbox("ann@loop.test")
    tally = figures.DeliveryTally()
    deliveries = [one_delivery("ann@loop.test")]
    if case == "two deliveries":
        deliveries.append(one_delivery("ann@loop.test"))
    elif case == "refusals waiting":
        tally.add("loop.test", "no_such_mailbox")
    else:
        settings.MAILADMIN_CHUNK_SIZE_BYTES = len(BODY)  # the trace lines make the copy longer

    assert stored_on_the_loop(deliveries, tally) is None
    assert (Message.objects.count(), DeliveryFigures.objects.count()) == (0, 0)


def test_a_copy_that_no_longer_fits_is_left_to_the_threads_which_refuse_it(make_mailbox):
    make_mailbox("ann@loop.test", quota_bytes=1000)
    deliveries = [one_delivery("ann@loop.test")]  # room at RCPT
    Mailbox.objects.filter(user__username="ann@loop.test").update(used_bytes=1000)

    assert stored_on_the_loop(deliveries) is None
    assert Message.objects.count() == 0
    assert summary(deliver_group(deliveries)) == [[(DeliveryStatus.OVER_QUOTA, None)]]


def test_a_copy_the_server_refuses_is_left_to_the_threads_and_the_connection_serves_on(make_mailbox):
    make_mailbox("ann@loop.test")
    make_mailbox("bob@loop.test")
    assert summary(deliver_group([one_delivery("ann@loop.test")]))[0][0][0] is DeliveryStatus.DELIVERED
    Mailbox.objects.filter(user__username="ann@loop.test").update(next_uid=1)  # the next UIDL is taken
    refused, then = one_delivery("ann@loop.test"), one_delivery("bob@loop.test")

    async def one_after_the_other(statements):
        first = await delivery.stored_alone_on_the_loop([refused], None, statements, no_thread)
        return first, await delivery.stored_alone_on_the_loop([then], None, statements, no_thread)

    first, second = on_the_loop(one_after_the_other, connections_at_most=1)
    assert first is None
    assert summary(second) == [[(DeliveryStatus.DELIVERED, first_uidl("bob@loop.test"))]]
    assert list(Message.objects.values_list("mailbox__user__username", flat=True).order_by("id")) == [
        "ann@loop.test",
        "bob@loop.test",
    ]
    assert counters("ann@loop.test")[:3] == (
        Message.objects.get(mailbox__user__username="ann@loop.test").size_bytes,
        1,
        1,
    )


@pytest.mark.parametrize("used_before", [0, 790])
def test_a_quota_warning_due_is_delivered_through_a_thread_and_only_then(make_mailbox, settings, used_before):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = "80"
    make_mailbox("ann@loop.test", quota_bytes=1000)
    Mailbox.objects.filter(user__username="ann@loop.test").update(used_bytes=used_before)
    handed: list[tuple] = []

    async def in_a_thread(function, *args):
        handed.append((function, *args))

    results = stored_on_the_loop([one_delivery("ann@loop.test")], in_a_thread=in_a_thread)

    assert summary(results)[0][0][0] is DeliveryStatus.DELIVERED
    if used_before == 0:  # under 80 % after it: nothing to announce
        assert handed == []
    else:
        [(function, copy)] = handed
        assert (function, copy.mailbox.address, copy.used_bytes) == (
            delivery._warn_if_quota_crossed,
            "ann@loop.test",
            used_before + copy.size_bytes,
        )


def test_a_quota_warning_that_cannot_be_handed_over_fails_no_delivery(make_mailbox, settings):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = "80"
    make_mailbox("ann@loop.test", quota_bytes=1000)
    Mailbox.objects.filter(user__username="ann@loop.test").update(used_bytes=790)

    async def shut_down(*_args):
        raise RuntimeError("cannot schedule new futures after shutdown")

    results = stored_on_the_loop([one_delivery("ann@loop.test")], in_a_thread=shut_down)
    assert summary(results) == [[(DeliveryStatus.DELIVERED, first_uidl("ann@loop.test"))]]


def test_a_quota_warning_that_cannot_be_worked_out_fails_no_delivery(make_mailbox):
    make_mailbox("ann@loop.test", quota_bytes=1000)
    Domain.objects.filter(name="loop.test").update(quota_warning_percents="eighty")

    results = stored_on_the_loop([one_delivery("ann@loop.test")])
    assert summary(results) == [[(DeliveryStatus.DELIVERED, first_uidl("ann@loop.test"))]]


# --- Connections --------------------------------------------------------------------------------


class BrokenConnection(SimpleNamespace):
    """A connection whose statement fails as ``error`` says, with ``broken`` as psycopg sets it."""

    async def execute(self, sql, params):
        raise self.error

    async def close(self):
        self.closed = True


@pytest.mark.parametrize(
    ("error", "broken", "writes", "outcome", "closed"),
    [
        (psycopg.OperationalError("server closed the connection"), True, True, "raised", True),
        (psycopg.OperationalError("server closed the connection"), True, False, "unanswered", True),
        (psycopg.errors.AdminShutdown("terminating connection"), False, True, "raised", True),
        (psycopg.errors.UniqueViolation("duplicate key"), False, True, "unanswered", False),
        (psycopg.errors.QueryCanceled("statement timeout"), False, True, "unanswered", False),
        (psycopg.errors.FeatureNotSupported(fastsql.STALE_PLAN), False, True, "unanswered", True),
    ],
    ids=[
        "lost-while-storing",
        "lost-while-looking-up",
        "ended-by-the-server",
        "refused",
        "timeout",
        "stale-plan",
    ],
)
def test_a_failed_statement_is_unanswered_unless_the_copy_may_be_stored(
    error, broken, writes, outcome, closed
):
    connection = BrokenConnection(error=error, broken=broken, closed=False)
    try:
        asyncio.run(loopsql._fetch_one(connection, "SELECT 1", {}, writes))
        happened = "answered"
    except loopsql.Unanswered:
        happened = "unanswered"
    except psycopg.OperationalError:
        happened = "raised"
    assert (happened, connection.closed) == (outcome, closed)


def test_a_connection_the_server_ended_is_replaced_before_it_is_handed_out(make_mailbox):
    make_mailbox("ann@loop.test")

    async def after_the_server_ended_it(statements):
        async with statements._pool.connection() as loop_connection:
            ended = loop_connection.info.backend_pid
        with_one_more = loopsql.LoopStatements(1)  # a connection of its own to end the other
        await with_one_more.open(wait=True)
        async with with_one_more._pool.connection() as other:
            await other.execute("SELECT pg_terminate_backend(%s)", [ended])
        await with_one_more.close()
        for _ in range(200):  # the server's farewell reaches the idle connection's socket
            if loopsql.has_input(loop_connection.pgconn.socket):
                break
            await asyncio.sleep(0.01)
        found = await statements.find_recipient("ann@loop.test", 100)
        async with statements._pool.connection() as loop_connection:
            return ended, loop_connection.info.backend_pid, found

    ended, now, found = on_the_loop(after_the_server_ended_it, connections_at_most=1)
    assert now != ended
    assert (found[0].address, found[1]) == ("ann@loop.test", True)


def test_the_loops_connections_are_named_and_in_the_time_zone_django_uses(make_mailbox, monkeypatch):
    elsewhere = loopsql.connection_parameters() | {"options": "-c TimeZone=Asia/Jakarta"}
    monkeypatch.setattr(loopsql, "connection_parameters", lambda: elsewhere)  # the server's zone, say

    async def settings_of(statements):
        async with statements._pool.connection() as loop_connection:
            cursor = await loop_connection.execute(
                "SELECT current_setting('application_name'), current_setting('TimeZone')"
            )
            return await cursor.fetchone(), loop_connection.autocommit

    assert on_the_loop(settings_of) == ((loopsql.APPLICATION_NAME, "UTC"), True)
