"""Group commit: how deliveries queue into groups, how many commit at once, and a failing copy fails alone."""

import asyncio

import pytest
from django.db import DataError, IntegrityError, InterfaceError, OperationalError
from django.db.models import Sum

from mailadmin.hosting import store
from mailadmin.mailin.delivery import (
    Delivery,
    DeliveryStatus,
    Recipient,
    RecipientResult,
    deliver,
    deliver_group,
    look_up_recipient,
)
from mailadmin.mailin.lmtp.server import GroupCommitter
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import Mailbox, Message


class GatedExecutor:
    """Runs ``deliver_group`` stand-ins one gate at a time, recording each group and the overlap."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.running = 0
        self.most_running = 0
        self.gate = asyncio.Event()

    async def run(self, function, deliveries, tally):
        self.groups.append(list(deliveries))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.gate.wait()
        self.running -= 1
        if "broken" in deliveries:
            raise RuntimeError("database gone")
        return [[f"stored {delivery}"] for delivery in deliveries]


async def commit_all(writers: int, deliveries: list[str], max_group: int = 64):
    """Submit one delivery per writer, let the writers take them, then submit the rest."""
    executor = GatedExecutor()
    committer = GroupCommitter(executor, max_group=max_group, writers=writers)
    futures = []
    for delivery in deliveries[:writers]:
        futures.append(committer.submit(delivery))
        await asyncio.sleep(0)  # a writer takes it as a group of its own
    futures += [committer.submit(delivery) for delivery in deliveries[writers:]]
    executor.gate.set()
    results = await asyncio.gather(*futures, return_exceptions=True)
    return executor, results


@pytest.mark.parametrize(("writers", "first_groups"), [(1, [["m0"]]), (2, [["m0"], ["m1"]])])
def test_deliveries_that_arrive_while_groups_commit_share_the_next_group(writers, first_groups):
    executor, results = asyncio.run(commit_all(writers, [f"m{n}" for n in range(6)]))
    assert executor.groups[:writers] == first_groups
    assert sorted(sum(executor.groups, [])) == [f"m{n}" for n in range(6)]
    assert len(executor.groups) == writers + 1  # the rest went together
    assert executor.most_running == writers
    assert results == [[f"stored m{n}"] for n in range(6)]


def test_a_group_is_cut_at_max_group_messages():
    executor, _ = asyncio.run(commit_all(1, [f"m{n}" for n in range(7)], max_group=3))
    assert [len(group) for group in executor.groups] == [1, 3, 3]  # after the first, 6 queued


def test_a_failed_group_fails_only_its_own_deliveries():
    executor, results = asyncio.run(commit_all(1, ["m0", "broken", "m2"]))
    assert executor.groups == [["m0"], ["broken", "m2"]]
    assert results[0] == ["stored m0"]
    assert [type(result) for result in results[1:]] == [RuntimeError, RuntimeError]


@pytest.mark.parametrize("writers", [1, 2])
def test_a_delivery_submitted_as_the_last_group_finishes_is_still_stored(writers):
    """The session woken by one commit may submit at once: a writer must be there for it."""

    async def scenario():
        executor = GatedExecutor()
        executor.gate.set()
        committer = GroupCommitter(executor, max_group=64, writers=writers)
        late: list[asyncio.Future] = []
        first = committer.submit("m0")
        first.add_done_callback(lambda _: late.append(committer.submit("late")))
        await first
        return await asyncio.wait_for(late[0], timeout=5)

    assert asyncio.run(scenario()) == ["stored late"]


# --- deliver_group: a copy that fails, fails alone ------------------------------------------------

SENDER = "s@remote.test"


def looked_up(*addresses: str) -> list[Recipient]:
    found = [look_up_recipient(address) for address in addresses]
    assert all(isinstance(entry, Recipient) for entry in found), found
    return found


def group_of(
    *recipient_lists: list[Recipient], body: bytes = b"Subject: g\r\n\r\ngroup\r\n"
) -> list[Delivery]:
    return [Delivery(recipients, spool_message([body]), SENDER) for recipients in recipient_lists]


def statuses(results: list[list[RecipientResult]]) -> list[list[tuple[str, DeliveryStatus]]]:
    return [[(result.recipient, result.status) for result in group] for group in results]


def stored_subjects(address: str) -> list[str]:
    return list(
        Message.objects.filter(mailbox__user__username=address)
        .order_by("pk")
        .values_list("subject", flat=True)
    )


def assert_counters_exact(address: str) -> None:
    mailbox = Mailbox.objects.select_related("domain").get(user__username=address)
    messages = Message.objects.filter(mailbox=mailbox)
    assert (mailbox.used_bytes, mailbox.used_messages) == (
        messages.aggregate(size=Sum("size_bytes"))["size"] or 0,
        messages.count(),
    )
    in_domain = Message.objects.filter(mailbox__domain=mailbox.domain).aggregate(size=Sum("size_bytes"))
    assert mailbox.domain.used_bytes == (in_domain["size"] or 0)


@pytest.fixture
def wedged(make_mailbox, settings) -> str:
    """A mailbox holding one message whose next_uid was set back: its next UIDL collides."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    address = make_mailbox("wedged@example.test").address
    assert deliver([address], [b"Subject: first\r\n\r\nfirst\r\n"])[0].delivered
    Mailbox.objects.filter(user__username=address).update(next_uid=1)
    return address


@pytest.mark.django_db
def test_a_copy_whose_uidl_collides_fails_alone_and_the_rest_of_the_group_is_stored_once(
    make_mailbox, wedged
):
    make_mailbox("one@example.test")
    make_mailbox("two@example.test")
    one, stuck, two = looked_up("one@example.test", wedged, "two@example.test")

    results = deliver_group(group_of([one], [stuck, two], [two]))

    assert statuses(results) == [
        [("one@example.test", DeliveryStatus.DELIVERED)],
        [(wedged, DeliveryStatus.TEMPORARY_FAILURE), ("two@example.test", DeliveryStatus.DELIVERED)],
        [("two@example.test", DeliveryStatus.DELIVERED)],
    ]
    assert stored_subjects("one@example.test") == ["g"]
    assert stored_subjects("two@example.test") == ["g", "g"]
    assert stored_subjects(wedged) == ["first"]
    assert Mailbox.objects.get(user__username=wedged).next_uid == 1  # its failed charge was rolled back
    assert sorted(
        Message.objects.filter(mailbox__user__username="two@example.test").values_list("uidl", flat=True)
    ) == [
        results[1][1].uidl,
        results[2][0].uidl,
    ]
    for address in ("one@example.test", "two@example.test", wedged):
        assert_counters_exact(address)


class StoreCalls:
    """Records each call of the store's group append (``("group", [addresses])``) and one-copy
    append (the address); a copy for an address in ``failing`` raises its error once stored,
    so only the rollback can remove what it wrote."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list = []
        self.failing: dict[str, Exception] = {}
        self._group, self._one = store.append_messages_in_group, store.append_message_in_group
        monkeypatch.setattr(store, "append_messages_in_group", self.append_group)
        monkeypatch.setattr(store, "append_message_in_group", self.append_one)

    def append_group(self, copies, domains_last=None):
        addresses = [copy.mailbox.address for copy in copies]
        self.calls.append(("group", addresses))
        stored = self._group(copies, domains_last)
        self._fail_if_any(addresses)
        return stored

    def append_one(self, mailbox, message, **options):
        self.calls.append(mailbox.address)
        stored = self._one(mailbox, message, **options)
        self._fail_if_any([mailbox.address])
        return stored

    def _fail_if_any(self, addresses: list[str]) -> None:
        for address in addresses:
            if address in self.failing:
                raise self.failing[address]


@pytest.fixture
def store_calls(monkeypatch) -> StoreCalls:
    return StoreCalls(monkeypatch)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "error",
    [IntegrityError("duplicate key"), DataError("value too long"), ValueError("a bug")],
    ids=["integrity-error", "data-error", "unexpected"],
)
def test_a_copy_that_raises_after_its_charge_fails_alone_and_leaves_no_partial_state(
    make_mailbox, settings, store_calls, error
):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    addresses = ["one@example.test", "bad@example.test", "two@example.test"]
    for address in addresses:
        make_mailbox(address)
    recipients = looked_up(*addresses)
    store_calls.failing["bad@example.test"] = error

    results = deliver_group(group_of(recipients))

    assert statuses(results) == [
        [
            ("one@example.test", DeliveryStatus.DELIVERED),
            ("bad@example.test", DeliveryStatus.TEMPORARY_FAILURE),
            ("two@example.test", DeliveryStatus.DELIVERED),
        ]
    ]
    assert store_calls.calls == [
        ("group", addresses),  # together: the error does not say whose it is
        "one@example.test", "bad@example.test",  # one at a time, until the failing copy
        "one@example.test", "two@example.test",  # without it
    ]  # fmt: skip
    assert [len(stored_subjects(r.address)) for r in recipients] == [1, 0, 1]
    assert Mailbox.objects.get(user__username="bad@example.test").next_uid == 1
    for recipient in recipients:
        assert_counters_exact(recipient.address)


@pytest.mark.django_db
def test_every_failing_copy_is_retried_once_and_the_group_keeps_the_others(
    make_mailbox, settings, store_calls
):
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    addresses = ["a@example.test", "bad1@example.test", "b@example.test", "bad2@example.test"]
    for address in addresses:
        make_mailbox(address)
    store_calls.failing = {address: IntegrityError("duplicate key") for address in addresses[1::2]}

    results = deliver_group(group_of(*([r] for r in looked_up(*addresses))))

    assert [group[0].status for group in results] == [
        DeliveryStatus.DELIVERED,
        DeliveryStatus.TEMPORARY_FAILURE,
        DeliveryStatus.DELIVERED,
        DeliveryStatus.TEMPORARY_FAILURE,
    ]
    assert store_calls.calls == [
        ("group", addresses),
        "a@example.test", "bad1@example.test",  # one at a time
        "a@example.test", "b@example.test", "bad2@example.test",  # without bad1
        "a@example.test", "b@example.test",  # without both
    ]  # fmt: skip
    assert [len(stored_subjects(address)) for address in addresses] == [1, 0, 1, 0]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "error",
    [
        OperationalError("server closed the connection unexpectedly"),
        InterfaceError("connection already closed"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_database_error_that_is_not_one_copys_fails_the_whole_group_without_a_retry(
    make_mailbox, store_calls, error
):
    for address in ("one@example.test", "two@example.test"):
        make_mailbox(address)
    recipients = looked_up("one@example.test", "two@example.test")
    store_calls.failing["two@example.test"] = error

    with pytest.raises(type(error)):
        deliver_group(group_of([recipients[0]], [recipients[1]]))
    assert store_calls.calls == [("group", ["one@example.test", "two@example.test"])]
    assert Message.objects.count() == 0
    assert list(Mailbox.objects.values_list("used_bytes", "used_messages", "next_uid")) == [(0, 0, 1)] * 2


@pytest.mark.django_db
def test_all_or_none_with_a_failing_copy_stores_nothing_and_says_which_one_failed(make_mailbox, wedged):
    make_mailbox("one@example.test")
    results = deliver_group(group_of(looked_up("one@example.test", wedged)), all_or_none=True)
    assert statuses(results) == [
        [("one@example.test", DeliveryStatus.NOT_ATTEMPTED), (wedged, DeliveryStatus.TEMPORARY_FAILURE)]
    ]
    assert stored_subjects("one@example.test") == []
    assert_counters_exact("one@example.test")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "sender"),
    [
        (b"Subject: a\x00b\r\n\r\nnul\r\n", SENDER),
        (b"Subject: =?utf-8?q?a=00b?=\r\n\r\nnul\r\n", SENDER),
        (b"Subject: long sender\r\n\r\nlong\r\n", "s" * 380 + "@remote.test"),
        (b"Subject: undecodable sender\r\n\r\nodd\r\n", "s\udcff@remote.test"),
    ],
    ids=["nul-subject", "nul-encoded-word", "392-character-sender", "undecodable-sender"],
)
def test_a_message_with_odd_header_or_sender_values_is_stored_at_the_first_attempt(
    make_mailbox, settings, store_calls, body, sender
):
    """Cleaned when the row is written, such a copy never fails, so the group is never stored again."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    make_mailbox("one@example.test")
    make_mailbox("two@example.test")
    one, two = looked_up("one@example.test", "two@example.test")
    plain = Delivery([one], spool_message([b"Subject: plain\r\n\r\nplain\r\n"]), SENDER)
    odd = Delivery([two], spool_message([body]), sender)
    results = deliver_group([plain, odd])

    assert statuses(results) == [
        [("one@example.test", DeliveryStatus.DELIVERED)],
        [("two@example.test", DeliveryStatus.DELIVERED)],
    ]
    assert store_calls.calls == [("group", ["one@example.test", "two@example.test"])]


@pytest.mark.django_db
def test_a_mailbox_named_again_in_one_delivery_gets_one_copy_and_a_result_per_name(make_mailbox, settings):
    """RFC 2033 wants one reply per accepted RCPT; the mailbox still gets the message once."""
    settings.MAILADMIN_QUOTA_WARNING_PERCENTS = ""
    make_mailbox("one@example.test")
    make_mailbox("two@example.test")
    names = ["one@example.test", "ONE@Example.test", "two@example.test", "one@example.test"]

    results = deliver(names, [b"Subject: g\r\n\r\ngroup\r\n"], sender=SENDER)

    assert [(r.recipient, r.status) for r in results] == [(name, DeliveryStatus.DELIVERED) for name in names]
    assert results[0].uidl == results[1].uidl == results[3].uidl
    assert stored_subjects("one@example.test") == ["g"]
    assert stored_subjects("two@example.test") == ["g"]
    assert_counters_exact("one@example.test")


@pytest.mark.django_db
def test_the_same_mailbox_in_two_deliveries_of_a_group_gets_both_messages(make_mailbox):
    make_mailbox("one@example.test")
    [one] = looked_up("one@example.test")
    results = deliver_group(group_of([one], [one]))
    assert statuses(results) == [[("one@example.test", DeliveryStatus.DELIVERED)]] * 2
    assert stored_subjects("one@example.test") == ["g", "g"]


@pytest.mark.django_db
def test_a_failing_copy_named_twice_fails_once_for_each_name(make_mailbox, wedged):
    make_mailbox("one@example.test")
    recipients = looked_up(wedged, "one@example.test", wedged.upper())
    results = deliver_group(group_of(recipients))
    assert statuses(results) == [
        [
            (wedged, DeliveryStatus.TEMPORARY_FAILURE),
            ("one@example.test", DeliveryStatus.DELIVERED),
            (wedged.upper(), DeliveryStatus.TEMPORARY_FAILURE),
        ]
    ]
    assert stored_subjects(wedged) == ["first"]
