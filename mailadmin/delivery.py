"""The one way mail gets in: ``deliver(recipients, stream)``.

It knows nothing of LMTP or exit codes; the doors (``manage.py deliver``, the LMTP listener)
translate its per-recipient results with small tables of their own.
"""

import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.db import DatabaseError, transaction

from mailadmin import store
from mailadmin.addresses import normalise_address
from mailadmin.messagefile import MessageTooLarge, Readable, SpooledMessage, spool_message
from mailadmin.models import Mailbox

logger = logging.getLogger(__name__)


class DeliveryStatus(enum.Enum):
    DELIVERED = "delivered"
    NO_SUCH_MAILBOX = "no such mailbox"
    MAILBOX_INACTIVE = "mailbox inactive"
    OVER_QUOTA = "over quota"
    TOO_LARGE = "message too large"
    TEMPORARY_FAILURE = "temporary failure"
    # All-or-none delivery only: this recipient was fine, but another one failed.
    NOT_ATTEMPTED = "not delivered because another recipient failed"


@dataclass(frozen=True)
class RecipientResult:
    recipient: str
    status: DeliveryStatus
    uidl: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is DeliveryStatus.DELIVERED


class _RecipientRefused(Exception):
    def __init__(self, status: DeliveryStatus) -> None:
        super().__init__(status.value)
        self.status = status


def deliver(
    recipients: Sequence[str],
    stream: Readable | Iterable[bytes],
    *,
    sender: str = "",
    all_or_none: bool = False,
) -> list[RecipientResult]:
    """Deliver one message to each recipient; return one result per recipient, in order.

    Each recipient's copy gets ``Return-Path:`` and ``Delivered-To:`` lines prepended. With
    ``all_or_none`` every copy is stored in one transaction, so either all recipients get
    the message or none does (a retry after failure can never duplicate it); otherwise each
    recipient is committed on its own. Returns only after the stored copies are committed.
    """
    addresses = [_normalised_or_none(recipient) for recipient in recipients]
    try:
        message = spool_message(stream)
    except MessageTooLarge:
        return [RecipientResult(recipient, DeliveryStatus.TOO_LARGE) for recipient in recipients]
    with message:
        if all_or_none:
            return _deliver_all_or_none(recipients, addresses, message, sender)
        return [
            _deliver_one(recipient, address, message, sender) for recipient, address in zip(recipients, addresses)
        ]


def _deliver_one(recipient: str, address: str | None, message: SpooledMessage, sender: str) -> RecipientResult:
    try:
        with transaction.atomic():
            uidl = _store_copy(address, message, sender)
    except _RecipientRefused as refusal:
        return RecipientResult(recipient, refusal.status)
    except DatabaseError:
        logger.exception("delivery to %s failed", address)
        return RecipientResult(recipient, DeliveryStatus.TEMPORARY_FAILURE)
    return RecipientResult(recipient, DeliveryStatus.DELIVERED, uidl)


def _deliver_all_or_none(
    recipients: Sequence[str], addresses: list[str | None], message: SpooledMessage, sender: str
) -> list[RecipientResult]:
    statuses: list[DeliveryStatus] = []
    uidls: list[str | None] = []
    try:
        with transaction.atomic():
            for address in addresses:
                try:
                    with transaction.atomic():
                        uidls.append(_store_copy(address, message, sender))
                    statuses.append(DeliveryStatus.DELIVERED)
                except _RecipientRefused as refusal:
                    uidls.append(None)
                    statuses.append(refusal.status)
            if any(status is not DeliveryStatus.DELIVERED for status in statuses):
                transaction.set_rollback(True)
    except DatabaseError:
        logger.exception("delivery to %s failed", ", ".join(filter(None, addresses)))
        return [RecipientResult(recipient, DeliveryStatus.TEMPORARY_FAILURE) for recipient in recipients]
    if all(status is DeliveryStatus.DELIVERED for status in statuses):
        return [RecipientResult(r, s, u) for r, s, u in zip(recipients, statuses, uidls)]
    return [
        RecipientResult(r, DeliveryStatus.NOT_ATTEMPTED if s is DeliveryStatus.DELIVERED else s)
        for r, s in zip(recipients, statuses)
    ]


def _store_copy(address: str | None, message: SpooledMessage, sender: str) -> str:
    if address is None:
        raise _RecipientRefused(DeliveryStatus.NO_SUCH_MAILBOX)
    mailbox = Mailbox.objects.select_related("user", "domain").for_address(address).first()
    if mailbox is None:
        raise _RecipientRefused(DeliveryStatus.NO_SUCH_MAILBOX)
    if not (mailbox.active and mailbox.domain.active and mailbox.user.is_active):
        raise _RecipientRefused(DeliveryStatus.MAILBOX_INACTIVE)
    try:
        stored = store.append_message(
            mailbox, message, prefix=trace_headers(sender, address), envelope_sender=sender
        )
    except store.OverQuota:
        raise _RecipientRefused(DeliveryStatus.OVER_QUOTA) from None
    return stored.uidl


def trace_headers(sender: str, recipient: str) -> bytes:
    """The Return-Path and Delivered-To lines of RFC 5321 section 4.4 and RFC 9228."""
    return f"Return-Path: <{_header_safe(sender)}>\r\nDelivered-To: {_header_safe(recipient)}\r\n".encode()


def _header_safe(value: str) -> str:
    """Envelope addresses come from the network: keep them on one line and in ASCII."""
    return "".join(c for c in value if 0x21 <= ord(c) <= 0x7E and c not in "<>")


def _normalised_or_none(recipient: str) -> str | None:
    try:
        return normalise_address(recipient)
    except ValueError:
        return None
