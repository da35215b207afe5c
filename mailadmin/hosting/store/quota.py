"""Quota recalculation: the counters (and next_uid) recomputed from the messages, and what drifted."""

from collections.abc import Callable, Collection
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, F, Sum

from mailadmin.hosting.store.accounts import get_mailbox
from mailadmin.models import Domain, Mailbox, Message

# --- Quota recalculation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """A counter that disagreed with the stored messages, and the value it was corrected to."""

    subject: str
    counter: str
    recorded: int
    actual: int


Record = Callable[[list[Drift]], None]


def recalculate_quota(
    address: str | None = None, *, domain_ids: Collection[int] | None = None, record: Record | None = None
) -> list[Drift]:
    """Recompute usage counters from the messages, correct them, and report what drifted.

    One mailbox (``address``) and its domain; or the mailboxes of ``domain_ids`` and those
    domains; or, with neither, everything. Each mailbox, then each domain, in id order (the
    order ``lock_group`` locks rows in), is corrected in a transaction of its own, so deliveries
    wait for one row at a time, never for the whole run; ``record(drifts)`` is called inside
    that transaction when a row drifted (the caller's audit row).

    ``next_uid`` is raised above the highest UID stored (never lowered), so a mailbox whose
    counter went back delivers again instead of failing on a UIDL already taken.
    """
    if address is not None:
        mailbox = get_mailbox(address)
        mailbox_ids, domain_list = [mailbox.pk], [mailbox.domain_id]
    else:
        mailboxes, domains = Mailbox.objects.all(), Domain.objects.all()
        if domain_ids is not None:
            mailboxes, domains = mailboxes.filter(domain_id__in=domain_ids), domains.filter(pk__in=domain_ids)
        mailbox_ids = list(mailboxes.order_by("pk").values_list("pk", flat=True))
        domain_list = list(domains.order_by("pk").values_list("pk", flat=True))
    drifts: list[Drift] = []
    for mailbox_id in mailbox_ids:
        drifts += _recalculate_mailbox(mailbox_id, record)
    for domain_id in domain_list:
        drifts += _recalculate_domain(domain_id, record)
    return drifts


def _recalculate_mailbox(mailbox_id: int, record: Record | None) -> list[Drift]:
    with transaction.atomic():
        mailbox = Mailbox.objects.select_for_update().select_related("user").get(pk=mailbox_id)
        totals = Message.objects.filter(mailbox_id=mailbox_id).aggregate(
            count=Count("id"), size=Sum("size_bytes")
        )
        actual = {"used_bytes": totals["size"] or 0, "used_messages": totals["count"]}
        highest_uid = _highest_uid(mailbox)
        if mailbox.next_uid <= highest_uid:
            actual["next_uid"] = highest_uid + 1
        drifts = [
            Drift(mailbox.address, counter, getattr(mailbox, counter), value)
            for counter, value in actual.items()
            if getattr(mailbox, counter) != value
        ]
        if drifts:  # changes too: a corrected count must not make a kept snapshot look current
            Mailbox.objects.filter(pk=mailbox_id).update(**actual, changes=F("changes") + 1)
            if record is not None:
                record(drifts)
    return drifts


def _highest_uid(mailbox: Mailbox) -> int:
    """The highest UID among the mailbox's UIDLs made by ``format_uidl`` with its uid_validity; 0 if none.

    Other UIDLs (imported from another server, or of an earlier uid_validity) cannot collide
    with new ones; imports already keep ``next_uid`` above the UIDs they bring.
    """
    suffix = f"{mailbox.uid_validity:08X}"
    highest = 0
    uidls = Message.objects.filter(mailbox_id=mailbox.pk, uidl__endswith=suffix)
    for uidl in uidls.values_list("uidl", flat=True).iterator():
        uid_text = uidl[: -len(suffix)]
        if uidl.endswith(suffix) and len(uid_text) >= 8 and _is_upper_hex(uid_text):
            highest = max(highest, int(uid_text, 16))
    return highest


def _is_upper_hex(text: str) -> bool:
    return all(c in "0123456789ABCDEF" for c in text)


def _recalculate_domain(domain_id: int, record: Record | None) -> list[Drift]:
    with transaction.atomic():
        domain = Domain.objects.select_for_update().get(pk=domain_id)
        actual = (
            Message.objects.filter(mailbox__domain_id=domain_id).aggregate(size=Sum("size_bytes"))["size"]
            or 0
        )
        if domain.used_bytes == actual:
            return []
        Domain.objects.filter(pk=domain_id).update(used_bytes=actual)
        drifts = [Drift(domain.name, "used_bytes", domain.used_bytes, actual)]
        if record is not None:
            record(drifts)
    return drifts
