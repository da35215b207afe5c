"""Messages and their chunks: stored with their quota charge, deleted with its release."""

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Sum
from django.utils import timezone
from django.utils.translation import gettext

from mailadmin.hosting.store import fastsql
from mailadmin.hosting.store.errors import InvalidInput, OverQuota
from mailadmin.mailin.messagefile import SpooledMessage
from mailadmin.models import Domain, Mailbox, Message, MessageChunk

ID_BATCH_SIZE = 500

# Columns shown in listings, filled from what the sender wrote. A value PostgreSQL refuses (a NUL
# in text, one longer than its column) would fail the delivery again on every retry, so each is
# cleaned and cut when the row is written; the message bytes keep what was sent.
_TEXT_COLUMN_LENGTHS = {
    name: Message._meta.get_field(name).max_length for name in ("subject", "from_header", "envelope_sender")
}
_CONTROL_CHARACTERS = dict.fromkeys([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# --- Messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredMessage:
    message_id: int
    uidl: str
    size_bytes: int
    mailbox_used_bytes: int  # the mailbox's usage right after this message was charged


def format_uidl(uid: int, uid_validity: int) -> str:
    """Dovecot's default pop3_uidl_format (%08Xu%08Xv), so migrated and new UIDLs look alike."""
    return f"{uid:08X}{uid_validity:08X}"


def append_message(
    mailbox: Mailbox,
    message: SpooledMessage,
    *,
    prefix: bytes = b"",
    envelope_sender: str = "",
    received_at: datetime | None = None,
    uidl: str | None = None,
    uid: int | None = None,
    import_key: str | None = None,
    enforce_quota: bool = True,
) -> StoredMessage:
    """Store ``prefix + message`` in ``mailbox``; raise OverQuota and store nothing if it won't fit.

    ``prefix`` is already-normalised header lines (Return-Path, Delivered-To). Imports pass the
    ``uidl`` clients already know, and the ``uid`` it was derived from so new UIDs stay above it.
    Runs in its own transaction, or in the caller's when one is open.
    """
    size = len(prefix) + message.size_bytes
    if uidl is not None:
        validate_uidl(uidl)
    with transaction.atomic():
        next_uid, used_bytes = _charge_quota(mailbox, size, imported_uid=uid, enforce=enforce_quota)
        message_uidl = uidl if uidl is not None else format_uidl(next_uid, mailbox.uid_validity)
        return _insert_message(
            mailbox, message, prefix, message_uidl, used_bytes, envelope_sender, received_at, import_key
        )


def append_message_in_group(
    mailbox: Mailbox, message: SpooledMessage, *, prefix: bytes, envelope_sender: str
) -> StoredMessage | None:
    """:func:`append_message` for one of many deliveries stored in the caller's transaction.

    A refusal (mailbox or domain quota, or a mailbox deleted since it was looked up) returns
    None, having undone its own partial charge, instead of raising: the transaction goes on
    without a savepoint per message. Database errors still raise, for the caller to roll back.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("append_message_in_group needs an open transaction")
    size = len(prefix) + message.size_bytes
    charge = {"size": size, "id": mailbox.pk, "uid_step": 1}
    with connection.cursor() as cursor:
        cursor.execute(fastsql.CHARGE_MAILBOX, charge)
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(fastsql.CHARGE_DOMAIN, {"size": size, "id": mailbox.domain_id})
        if cursor.rowcount != 1:
            cursor.execute(fastsql.UNCHARGE_MAILBOX, charge)  # its UID stays used: UIDs are never reused
            return None
    next_uid, used_bytes = row
    uidl = format_uidl(next_uid - 1, mailbox.uid_validity)
    return _insert_message(mailbox, message, prefix, uidl, used_bytes, envelope_sender)


def mark_quota_warning(mailbox_id: int, percent: int) -> bool:
    """Move the mailbox's announced warning percentage to ``percent``; True when this call raised it.

    Conditional UPDATEs: of deliveries crossing the same line at once, exactly one raises the
    mark (and so sends the warning); a lower ``percent`` (mail was deleted) lowers it, so the
    next crossing warns again.
    """
    marks = Mailbox.objects.filter(pk=mailbox_id)
    if marks.filter(quota_warning_percent__lt=percent).update(quota_warning_percent=percent):
        return True
    marks.filter(quota_warning_percent__gt=percent).update(quota_warning_percent=percent)
    return False


def lock_group(mailboxes: Iterable[Mailbox]) -> None:
    """Row-lock every mailbox of a group, then every domain, each in id order.

    Writers take a mailbox's row before its domain's (``append_message``, the POP3 UPDATE
    state). A group charging several mailboxes would otherwise take them in delivery order,
    with domain rows in between, and two groups (two LMTP workers, two hosts) could each hold
    a row the other waits for. One global order up front rules that deadlock out. Not needed
    for one mailbox, nor on SQLite, which has one writer at a time and no row locks.
    """
    mailboxes = list(mailboxes)
    mailbox_ids = sorted({mailbox.pk for mailbox in mailboxes})
    if len(mailbox_ids) < 2 or not connection.features.has_select_for_update:
        return
    domain_ids = sorted({mailbox.domain_id for mailbox in mailboxes})
    with connection.cursor() as cursor:
        for table, ids in ((fastsql.MAILBOX_TABLE, mailbox_ids), (fastsql.DOMAIN_TABLE, domain_ids)):
            placeholders = ", ".join(["%s"] * len(ids))
            cursor.execute(f"SELECT id FROM {table} WHERE id IN ({placeholders}) ORDER BY id FOR UPDATE", ids)


def _insert_message(
    mailbox: Mailbox,
    message: SpooledMessage,
    prefix: bytes,
    uidl: str,
    mailbox_used_bytes: int,
    envelope_sender: str,
    received_at: datetime | None = None,
    import_key: str | None = None,
) -> StoredMessage:
    """The message row and its chunks, once the quota has been charged."""
    size = len(prefix) + message.size_bytes
    message_id = fastsql.insert_returning_pk(
        Message,
        mailbox_id=mailbox.pk,
        uidl=uidl,
        size_bytes=size,
        received_at=received_at or timezone.now(),
        envelope_sender=_storable(envelope_sender, "envelope_sender"),
        header_size_bytes=len(prefix) + message.header_size_bytes,
        subject=_storable(message.summary.subject, "subject"),
        from_header=_storable(message.summary.from_header, "from_header"),
        import_key=import_key,
    )
    fastsql.write_chunks(message_id, _prefixed(prefix, message))
    return StoredMessage(message_id, uidl, size, mailbox_used_bytes)


def _storable(value: str, column: str) -> str:
    """``value`` fit for a text column: control characters but tab dropped, cut to the column's length.

    A lone surrogate (a byte of a command-line argument that is not UTF-8) becomes U+FFFD: no
    database driver can encode it.
    """
    value = value.translate(_CONTROL_CHARACTERS)
    if not value.isascii():
        value = _LONE_SURROGATE.sub("\ufffd", value)
    return value[: _TEXT_COLUMN_LENGTHS[column]]


def _charge_quota(mailbox: Mailbox, size: int, *, imported_uid: int | None, enforce: bool) -> tuple[int, int]:
    """Charge one message of ``size`` bytes to the mailbox and its domain.

    Returns the message's UID and the mailbox's usage after the charge. Each counter moves by
    a single conditional UPDATE, so the check and the charge are one statement: two
    deliveries racing for the last bytes cannot both pass.
    """
    if imported_uid is not None:
        # Keep new UIDs above every imported one; Greatest() is not portable to older SQLite.
        Mailbox.objects.filter(pk=mailbox.pk, next_uid__lte=imported_uid).update(next_uid=imported_uid + 1)
    with connection.cursor() as cursor:
        cursor.execute(
            fastsql.CHARGE_MAILBOX if enforce else fastsql.CHARGE_MAILBOX_UNCHECKED,
            {"size": size, "id": mailbox.pk, "uid_step": 0 if imported_uid is not None else 1},
        )
        row = cursor.fetchone()
    if row is None:
        raise OverQuota(gettext("mailbox %(address)s is over quota") % {"address": mailbox.address})
    with connection.cursor() as cursor:
        cursor.execute(
            fastsql.CHARGE_DOMAIN if enforce else fastsql.CHARGE_DOMAIN_UNCHECKED,
            {"size": size, "id": mailbox.domain_id},
        )
        if cursor.rowcount != 1:
            raise OverQuota(gettext("domain of %(address)s is over quota") % {"address": mailbox.address})
    next_uid, used_bytes = row
    return (imported_uid if imported_uid is not None else next_uid - 1), used_bytes


def _prefixed(prefix: bytes, message: SpooledMessage) -> Iterator[bytes]:
    if prefix:
        yield prefix
    yield from message.chunks(settings.MAILADMIN_CHUNK_SIZE_BYTES)


def validate_uidl(uidl: str) -> None:
    """RFC 1939 section 7: 1-70 characters in the range 0x21-0x7E; we also forbid '/'."""
    if not 1 <= len(uidl) <= 70 or any(not 0x21 <= ord(c) <= 0x7E or c == "/" for c in uidl):
        raise InvalidInput(
            gettext("invalid UIDL %(uidl)r: 1-70 printable characters without '/'") % {"uidl": uidl}
        )


def iter_message_bytes(message_id: int) -> Iterator[bytes]:
    """Yield a message's bytes chunk by chunk, one row in memory at a time."""
    seq = 0
    while (chunk := fastsql.read_chunk(message_id, seq)) is not None:
        yield chunk
        seq += 1


def delete_messages(mailbox: Mailbox, message_ids: Iterable[int]) -> tuple[int, int]:
    """Delete messages of one mailbox and release their quota; return (count, bytes).

    Ids that are already gone (or belong to another mailbox) are skipped, so a retried commit
    is harmless. Runs in its own transaction, or in the caller's when one is open.
    """
    ids = list(message_ids)
    count = size = 0
    with transaction.atomic():
        for start in range(0, len(ids), ID_BATCH_SIZE):
            batch = Message.objects.filter(mailbox_id=mailbox.pk, pk__in=ids[start : start + ID_BATCH_SIZE])
            totals = batch.aggregate(count=Count("id"), size=Sum("size_bytes"))
            MessageChunk.objects.filter(message__in=batch.values("pk")).delete()
            batch.only("id").delete()
            count += totals["count"]
            size += totals["size"] or 0
        if count:
            Mailbox.objects.filter(pk=mailbox.pk).update(
                used_bytes=F("used_bytes") - size, used_messages=F("used_messages") - count
            )
            Domain.objects.filter(pk=mailbox.domain_id).update(used_bytes=F("used_bytes") - size)
    return count, size


# --- Import and export -----------------------------------------------------------------------


def existing_import_markers(mailbox: Mailbox) -> tuple[set[str], set[str]]:
    """(UIDLs, import keys) already in ``mailbox``: what a re-run import must skip."""
    uidls: set[str] = set()
    import_keys: set[str] = set()
    rows = Message.objects.filter(mailbox_id=mailbox.pk).values_list("uidl", "import_key")
    for uidl, import_key in rows.iterator():
        uidls.add(uidl)
        if import_key is not None:
            import_keys.add(import_key)
    return uidls, import_keys


@dataclass(frozen=True)
class ExportEntry:
    message_id: int
    size_bytes: int
    envelope_sender: str
    received_at: datetime


def iter_mailbox_messages_for_export(mailbox: Mailbox) -> Iterator[ExportEntry]:
    """The mailbox's messages in delivery order, read in batches so no cursor stays open.

    Read the bytes with ``iter_message_bytes``; a message deleted meanwhile yields fewer than
    ``size_bytes``, which is how an exporter tells it was removed mid-read.
    """
    last_id = 0
    fields = ("pk", "size_bytes", "envelope_sender", "received_at")
    while batch := list(
        Message.objects.for_maildrop(mailbox).filter(pk__gt=last_id).values_list(*fields)[:ID_BATCH_SIZE]
    ):
        yield from (ExportEntry(*row) for row in batch)
        last_id = batch[-1][0]
