"""Counters only the store writes: no model save() can put back a stale read, and recalcquota repairs UIDs."""

import threading

import pytest
from django.db import connection

from mailadmin.hosting import store
from mailadmin.mailin.delivery import DeliveryStatus, deliver
from mailadmin.models import Domain, Mailbox, Message

STORE_OWNED = {
    Mailbox: [
        "used_bytes",
        "used_messages",
        "next_uid",
        "uid_validity",
        "changes",
        "quota_warning_percent",
        "last_login_at",
        "last_login_from",
    ],
    Domain: ["used_bytes"],
}
CASES = [(model, name) for model, names in STORE_OWNED.items() for name in names]


def counters(instance: Mailbox | Domain) -> dict[str, int]:
    fresh = type(instance).objects.get(pk=instance.pk)
    return {name: getattr(fresh, name) for name in STORE_OWNED[type(instance)]}


def row_of(model: type, mailbox: Mailbox) -> Mailbox | Domain:
    if model is Mailbox:
        return Mailbox.objects.get(pk=mailbox.pk)
    return Domain.objects.get(pk=mailbox.domain_id)


@pytest.mark.django_db
def test_store_owned_fields_are_the_ones_the_models_name():
    assert {model: list(model.STORE_OWNED_FIELDS) for model in STORE_OWNED} == STORE_OWNED


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "name"), CASES, ids=[f"{m.__name__}.{n}" for m, n in CASES])
def test_a_full_save_never_writes_a_store_owned_field(make_mailbox, model, name):
    mailbox = make_mailbox()
    deliver([mailbox.address], [b"x" * 100])
    instance = row_of(model, mailbox)
    before = counters(instance)
    setattr(instance, name, 12345)
    instance.active = False
    instance.save()
    assert counters(instance) == before
    assert type(instance).objects.get(pk=instance.pk).active is False


@pytest.mark.django_db
@pytest.mark.parametrize(("model", "name"), CASES, ids=[f"{m.__name__}.{n}" for m, n in CASES])
def test_naming_a_store_owned_field_in_update_fields_is_refused(make_mailbox, model, name):
    instance = row_of(model, make_mailbox())
    before = counters(instance)
    setattr(instance, name, 12345)
    with pytest.raises(ValueError, match=f"{name} is written only by the store"):
        instance.save(update_fields=[name, "active"])
    assert counters(instance) == before


@pytest.mark.django_db
def test_a_new_row_is_still_inserted_with_its_initial_counters():
    domain = Domain(name="fresh.test")
    domain.save()
    assert Domain.objects.get(name="fresh.test").used_bytes == 0


@pytest.mark.django_db(transaction=True)
def test_a_stale_admin_save_loses_no_delivery_and_does_not_wedge_the_mailbox(make_mailbox):
    """The lost update of the issue, with the delivery committed on a second connection."""
    mailbox = make_mailbox("stale@example.test")
    deliver([mailbox.address], [b"first"])
    stale_mailbox = Mailbox.objects.select_related("user").get(pk=mailbox.pk)
    stale_domain = Domain.objects.get(pk=mailbox.domain_id)
    statuses = []

    def deliver_elsewhere() -> None:
        try:
            statuses.extend(result.status for result in deliver([mailbox.address], [b"second"]))
        finally:
            connection.close()

    other = threading.Thread(target=deliver_elsewhere)
    other.start()
    other.join()
    assert statuses == [DeliveryStatus.DELIVERED]
    stale_mailbox.quota_bytes = 10_000_000
    stale_mailbox.save()
    stale_domain.max_mailboxes = 50
    stale_domain.save()

    assert deliver([mailbox.address], [b"third"])[0].status is DeliveryStatus.DELIVERED
    mailbox.refresh_from_db()
    sizes = sorted(Message.objects.filter(mailbox=mailbox).values_list("size_bytes", flat=True))
    assert (mailbox.used_messages, mailbox.used_bytes, mailbox.next_uid) == (3, sum(sizes), 4)
    assert (mailbox.quota_bytes, Domain.objects.get(pk=mailbox.domain_id).max_mailboxes) == (10_000_000, 50)
    assert Domain.objects.get(pk=mailbox.domain_id).used_bytes == sum(sizes)
    assert sorted(Message.objects.filter(mailbox=mailbox).values_list("uidl", flat=True)) == [
        store.format_uidl(uid, mailbox.uid_validity) for uid in (1, 2, 3)
    ]


@pytest.mark.django_db
def test_recalcquota_moves_next_uid_above_the_highest_uid_stored(make_mailbox):
    mailbox = make_mailbox("wedged@example.test")
    for body in (b"one", b"two", b"three"):
        deliver([mailbox.address], [body])
    Mailbox.objects.filter(pk=mailbox.pk).update(next_uid=2)
    drifts = store.recalculate_quota(mailbox.address)
    assert [(d.subject, d.counter, d.recorded, d.actual) for d in drifts] == [
        ("wedged@example.test", "next_uid", 2, 4)
    ]
    result = deliver([mailbox.address], [b"four"])[0]
    assert result.status is DeliveryStatus.DELIVERED
    assert Message.objects.filter(mailbox=mailbox).order_by("-id").first().uidl == store.format_uidl(
        4, mailbox.uid_validity
    )


@pytest.mark.django_db
def test_recalcquota_never_lowers_next_uid_and_ignores_foreign_uidls(make_mailbox):
    mailbox = make_mailbox("kept@example.test")
    deliver([mailbox.address], [b"one"])
    store.delete_messages(mailbox, Message.objects.filter(mailbox=mailbox).values_list("pk", flat=True))
    deliver([mailbox.address], [b"two"])
    Message.objects.filter(mailbox=mailbox).update(uidl=store.format_uidl(900, mailbox.uid_validity + 1))
    Mailbox.objects.filter(pk=mailbox.pk).update(next_uid=7)
    assert store.recalculate_quota(mailbox.address) == []
    mailbox.refresh_from_db()
    assert mailbox.next_uid == 7
