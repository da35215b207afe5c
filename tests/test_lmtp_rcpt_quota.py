"""LMTP's RCPT look-up and the store's charge apply one quota rule: they agree at every boundary."""

import pytest
from django.db import transaction

from mailadmin.hosting import store
from mailadmin.mailin.delivery import DeliveryStatus, Recipient, look_up_recipient
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import Domain, Mailbox

pytestmark = pytest.mark.django_db

ADDRESS = "edge@example.test"
SIZE = 100  # the message tried at each boundary
MESSAGE = b"x" * (SIZE - 2) + b"\r\n"


def store_accepts(mailbox: Mailbox) -> bool:
    """Whether the store charges (and stores) a SIZE-byte message now; rolled back either way."""
    with transaction.atomic():
        with spool_message([MESSAGE]) as message:
            assert message.size_bytes == SIZE
            stored = store.append_message_in_group(mailbox, message, prefix=b"", envelope_sender="")
        transaction.set_rollback(True)
    return stored is not None


@pytest.mark.parametrize(
    ("mailbox_counters", "domain_counters", "fits"),
    [
        ({"quota_bytes": 1000, "used_bytes": 900}, {}, True),  # exactly full afterwards
        ({"quota_bytes": 1000, "used_bytes": 901}, {}, False),  # one byte over
        ({"quota_bytes": 1000, "used_bytes": 5000}, {}, False),  # already over (quota lowered)
        ({"quota_bytes": 0, "used_bytes": 10**12}, {}, True),  # 0 is no limit
        ({"quota_messages": 3, "used_messages": 2}, {}, True),  # the last message allowed
        ({"quota_messages": 3, "used_messages": 3}, {}, False),
        ({}, {"quota_bytes": 1000, "used_bytes": 900}, True),  # the domain's cap, exactly reached
        ({}, {"quota_bytes": 1000, "used_bytes": 901}, False),
        ({"quota_bytes": 1000, "used_bytes": 900}, {"quota_bytes": 1000, "used_bytes": 901}, False),
    ],
    ids=[
        "exactly-full",
        "one-byte-over",
        "already-over",
        "unlimited",
        "last-message",
        "message-count-reached",
        "domain-exactly-full",
        "domain-one-byte-over",
        "mailbox-fits-domain-not",
    ],
)
def test_rcpt_and_the_charge_agree_at_the_boundary(make_mailbox, mailbox_counters, domain_counters, fits):
    mailbox = make_mailbox(ADDRESS)
    Mailbox.objects.filter(pk=mailbox.pk).update(**mailbox_counters)
    Domain.objects.filter(pk=mailbox.domain_id).update(**domain_counters)

    found = look_up_recipient(ADDRESS, SIZE)

    assert (found if found is DeliveryStatus.OVER_QUOTA else type(found)) == (
        Recipient if fits else DeliveryStatus.OVER_QUOTA
    )
    assert store_accepts(Mailbox.objects.get(pk=mailbox.pk)) is fits


def test_rcpt_without_a_declared_size_asks_for_one_byte(make_mailbox):
    mailbox = make_mailbox(ADDRESS, quota_bytes=1000)
    Mailbox.objects.filter(pk=mailbox.pk).update(used_bytes=999)
    assert isinstance(look_up_recipient(ADDRESS), Recipient)
    Mailbox.objects.filter(pk=mailbox.pk).update(used_bytes=1000)
    assert look_up_recipient(ADDRESS) is DeliveryStatus.OVER_QUOTA


def test_rcpt_look_up_is_one_query(make_mailbox, django_assert_num_queries):
    make_mailbox(ADDRESS)
    with django_assert_num_queries(1):
        assert isinstance(look_up_recipient(ADDRESS, SIZE), Recipient)


def test_the_size_declared_in_mail_from_is_checked_against_the_room_left_at_rcpt(make_mailbox):
    make_mailbox("small@example.test", quota_bytes=5000)
    make_mailbox("roomy@example.test", quota_bytes=6000)
    assert look_up_recipient("small@example.test", 5500) is DeliveryStatus.OVER_QUOTA
    assert isinstance(look_up_recipient("roomy@example.test", 5500), Recipient)
