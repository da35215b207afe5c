"""The row serializers read a row as DRF's ``Serializer`` reads it through the declared fields,
without building those fields for each response."""

from datetime import UTC, datetime

import pytest
from rest_framework import serializers as drf

from mailadmin.api import serializers
from mailadmin.hosting import aliases, services
from mailadmin.hosting.actors import Actor
from mailadmin.hosting.store.fastsql import find_mailbox
from mailadmin.models import Alias, Mailbox
from tests.api_helpers import PASSWORD_HASH

pytestmark = pytest.mark.django_db


def as_drf_reads_it(serializer_class, row) -> dict:
    return drf.Serializer.to_representation(serializer_class(row), row)


@pytest.fixture
def domain() -> str:
    services.create_domain(Actor.cli(), "example.test")
    return "example.test"


def test_a_mailbox_reads_as_through_its_declared_fields(domain):
    services.create_mailbox(Actor.cli(), "a@example.test", password_hash=PASSWORD_HASH, quota_bytes=10**6)
    services.create_mailbox(Actor.cli(), "b@example.test", password_hash=PASSWORD_HASH)
    Mailbox.objects.filter(user__username="b@example.test").update(
        last_login_at=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        last_login_from="192.0.2.7",
        active=False,
        used_bytes=123,
        used_messages=4,
    )
    for address in ("a@example.test", "b@example.test"):
        mailbox = find_mailbox(address)
        shown = serializers.MailboxSerializer(mailbox).data
        assert shown == as_drf_reads_it(serializers.MailboxSerializer, mailbox)
        assert list(shown) == list(serializers.MailboxSerializer().fields)
    assert serializers.MailboxSerializer(find_mailbox("b@example.test")).data["last_login"] == {
        "time": "2026-01-02T03:04:05.678000Z",
        "client_address": "192.0.2.7",
    }


def test_a_list_of_mailboxes_reads_each_row_alike(domain):
    for address in ("a@example.test", "b@example.test"):
        services.create_mailbox(Actor.cli(), address, password_hash=PASSWORD_HASH)
    rows = list(Mailbox.objects.select_related("user", "domain").order_by("user__username"))
    shown = serializers.MailboxSerializer(rows, many=True).data
    assert shown == [as_drf_reads_it(serializers.MailboxSerializer, row) for row in rows]


def test_an_alias_and_a_catch_all_read_as_through_their_declared_fields(domain):
    services.create_mailbox(Actor.cli(), "a@example.test", password_hash=PASSWORD_HASH)
    aliases.save_alias(Actor.cli(), "sales@example.test", ["a@example.test", "out@elsewhere.test"])
    aliases.save_alias(Actor.cli(), "@example.test", ["a@example.test"], active=False)
    rows = aliases.with_recent_counts(Alias.objects.all()).prefetch_related("destinations").order_by("source")
    assert len(rows) == 2
    for alias in rows:
        shown = serializers.AliasSerializer(alias).data
        assert shown == as_drf_reads_it(serializers.AliasSerializer, alias)
        assert list(shown) == list(serializers.AliasSerializer().fields)
