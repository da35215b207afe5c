"""Messages and their chunks: stored with their quota charge, deleted with its release."""

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
        new = _NewMessage(
            mailbox, message, prefix, message_uidl, used_bytes, envelope_sender, received_at, import_key
        )
        return _insert_messages([new])[0]


def append_message_in_group(
    mailbox: Mailbox,
    message: SpooledMessage,
    *,
    prefix: bytes,
    envelope_sender: str,
    domains_last: "DomainChargesLast | None" = None,
) -> StoredMessage | None:
    """:func:`append_message` for one of many deliveries stored in the caller's transaction.

    A refusal (mailbox or domain quota, or a mailbox deleted since it was looked up) returns
    None, having undone its own partial charge, instead of raising: the transaction goes on
    without a savepoint per message. Database errors still raise, for the caller to roll back.
    With ``domains_last`` the domain's charge waits there instead (see :class:`DomainChargesLast`).
    """
    _require_transaction()
    copy = GroupCopy(mailbox, message, prefix, envelope_sender)
    charge = _charge_copy(copy, domains_last)
    return None if charge is None else _insert_messages([_NewMessage.of(copy, charge)])[0]


def append_lone_copy(copy: "GroupCopy", counted_hour: datetime) -> StoredMessage | None:
    """Store a delivery of one copy in one statement of its own, counted in the delivery
    figures of ``counted_hour``; None, with nothing written, when it does not fit (the
    mailbox's quota or its domain's) or the mailbox is gone, when it is larger than a chunk,
    and always on SQLite, which has no such statement.

    The usual LMTP delivery on PostgreSQL (see ``fastsql.store_lone_copy``), for which a
    group's transaction would cost seven round trips where this costs one. The caller stores
    a copy refused here as any other, which finds out why.
    """
    lone = lone_copy(copy, counted_hour)
    return None if lone is None else stored_lone_copy(copy, fastsql.store_lone_copy(lone))


def lone_copy(copy: "GroupCopy", counted_hour: datetime) -> fastsql.LoneCopy | None:
    """What :func:`append_lone_copy` stores of ``copy`` (its row's fields and its bytes, read
    from a spool that holds a copy this small in memory), or None when it cannot be stored so."""
    if not fastsql.stores_lone_copies() or copy.size_bytes > settings.MAILADMIN_CHUNK_SIZE_BYTES:
        return None
    new = _NewMessage(copy.mailbox, copy.message, copy.prefix, "", 0, copy.envelope_sender)
    fields = dict(zip(_NewMessage.COLUMNS, new.row(), strict=True))
    del fields["uidl"], fields["import_key"]
    return fastsql.LoneCopy(
        copy.mailbox.pk,
        copy.mailbox.domain_id,
        copy.mailbox.uid_validity,
        fields,
        b"".join(_prefixed(copy.prefix, copy.message)),
        counted_hour,
    )


def stored_lone_copy(copy: "GroupCopy", stored: fastsql.LoneCopyStored | None) -> StoredMessage | None:
    """The stored message of a lone copy's statement, None when it stored nothing."""
    if stored is None:
        return None
    uidl = format_uidl(stored.uid, copy.mailbox.uid_validity)
    return StoredMessage(stored.message_id, uidl, copy.size_bytes, stored.used_bytes)


class DomainChargesLast:
    """The domain charges of a group's copies, held back to the end of its transaction.

    Every delivery to a domain charges the domain's row, and on PostgreSQL that row stays
    locked until the commit. Charged along with the mailbox, it kept every other delivery to
    the domain waiting through the rest of the transaction (the message and chunk inserts, the
    figures): a busy domain's deliveries went one at a time. Charged by :meth:`charge`, after the
    copies are in, the lock is held only for the last statements and the commit.

    The mailbox rows are still taken first, as every writer takes them. When a domain has no
    room left for its copies at the end, :meth:`charge` says so and the caller rolls the group
    back and stores it again charging each domain with its mailbox, which refuses exactly the
    copies that do not fit.
    """

    def __init__(self) -> None:
        self._bytes: Counter[int] = Counter()

    def add(self, domain_id: int, size_bytes: int) -> None:
        self._bytes[domain_id] += size_bytes

    def charge(self) -> bool:
        """Charge every domain its copies' bytes (locked in id order); False if one has no room."""
        charges = sorted(self._bytes.items())
        if len(charges) > 1:
            _lock_rows(fastsql.DOMAIN_TABLE, [domain_id for domain_id, _ in charges])
        return len(fastsql.charge_domains(charges)) == len(charges)


@dataclass(frozen=True)
class GroupCopy:
    """One message for one mailbox, among a group's (:func:`append_messages_in_group`)."""

    mailbox: Mailbox
    message: SpooledMessage
    prefix: bytes
    envelope_sender: str

    @property
    def size_bytes(self) -> int:
        return len(self.prefix) + self.message.size_bytes


def append_messages_in_group(
    copies: Sequence[GroupCopy], domains_last: DomainChargesLast | None = None
) -> list[StoredMessage | None]:
    """:func:`append_message_in_group` for many copies, in the same few statements however many.

    The copies of each mailbox are charged together (one UPDATE for all mailboxes, one for all
    domains), their rows inserted by one INSERT and their chunks by as few as their bytes allow.
    A mailbox or domain without room for all its copies at once has them charged one at a
    time, in group order, after the others, as :func:`append_message_in_group` charges them.
    Returns one result per copy, None for a refused one.

    A database error here cannot say which copy caused it (a UIDL that collides, a value
    refused): the caller rolls back and stores the copies one at a time to find out. With
    ``domains_last`` the domains' charges wait there instead (see :class:`DomainChargesLast`).
    """
    _require_transaction()
    charges = _charge_group(copies, domains_last)
    stored = iter(
        _insert_messages(
            [_NewMessage.of(copy, charge) for copy, charge in zip(copies, charges, strict=True) if charge]
        )
    )
    return [next(stored) if charge else None for charge in charges]


# A copy's charge: its UID and its mailbox's usage right after it was charged.
_Charge = tuple[int, int]


def _charge_group(
    copies: Sequence[GroupCopy], domains_last: DomainChargesLast | None
) -> list[_Charge | None]:
    """Charge the group's copies: mailboxes and domains that have room for all of theirs at once
    in one statement each, the others copy by copy. Writes mailboxes before domains, as every
    writer does (on PostgreSQL the caller has locked them all first: ``lock_group``); with
    ``domains_last``, only the mailboxes, leaving the domains' charges there."""
    by_mailbox: dict[int, list[int]] = {}  # mailbox id -> its copies' places, in group order
    for index, copy in enumerate(copies):
        by_mailbox.setdefault(copy.mailbox.pk, []).append(index)
    total = {
        mailbox_id: sum(copies[i].size_bytes for i in places) for mailbox_id, places in by_mailbox.items()
    }
    charged = fastsql.charge_mailboxes(
        [(mailbox_id, total[mailbox_id], len(by_mailbox[mailbox_id])) for mailbox_id in sorted(by_mailbox)]
    )
    domain_of = {copy.mailbox.pk: copy.mailbox.domain_id for copy in copies}
    domain_total: Counter[int] = Counter()
    for mailbox_id in charged:
        domain_total[domain_of[mailbox_id]] += total[mailbox_id]
    if domains_last is None:
        refused_domains = set(domain_total) - fastsql.charge_domains(sorted(domain_total.items()))
    else:
        refused_domains = set()
        for domain_id, size_bytes in domain_total.items():
            domains_last.add(domain_id, size_bytes)
    charges: list[_Charge | None] = [None] * len(copies)
    for mailbox_id, (next_uid, used_bytes) in charged.items():
        places = by_mailbox[mailbox_id]
        if domain_of[mailbox_id] in refused_domains:
            _uncharge(mailbox_id, total[mailbox_id], len(places), uids=len(places))
            continue
        uid, used_bytes = next_uid - len(places), used_bytes - total[mailbox_id]
        for place in places:
            used_bytes += copies[place].size_bytes
            charges[place] = (uid, used_bytes)
            uid += 1
    for place, copy in enumerate(copies):
        if copy.mailbox.pk not in charged or domain_of[copy.mailbox.pk] in refused_domains:
            charges[place] = _charge_copy(copy, domains_last)
    return charges


def _charge_copy(copy: GroupCopy, domains_last: DomainChargesLast | None) -> _Charge | None:
    """Charge one copy to its mailbox and domain (or leave the domain's to ``domains_last``);
    None, with nothing charged, if either is full."""
    mailbox, size = copy.mailbox, copy.size_bytes
    with fastsql.prepared_cursor() as cursor:
        cursor.execute(fastsql.CHARGE_MAILBOX, {"size": size, "id": mailbox.pk, "uid_step": 1})
        row = cursor.fetchone()
        if row is None:
            return None
        next_uid, used_bytes = row
        if domains_last is not None:
            domains_last.add(mailbox.domain_id, size)
            return next_uid - 1, used_bytes
        cursor.execute(fastsql.CHARGE_DOMAIN, {"size": size, "domain_id": mailbox.domain_id})
        if cursor.rowcount == 1:
            return next_uid - 1, used_bytes
    _uncharge(mailbox.pk, size, 1, uids=0)  # its UID stays used: UIDs are never reused
    return None


def _uncharge(mailbox_id: int, size: int, messages: int, *, uids: int) -> None:
    """Undo a charge whose domain refused it; ``uids`` of the UIDs it took go back (those of a
    charge in this very transaction, under its lock, from which no UIDL was made)."""
    with fastsql.prepared_cursor() as cursor:
        cursor.execute(
            fastsql.UNCHARGE_MAILBOX, {"size": size, "messages": messages, "uids": uids, "id": mailbox_id}
        )


def _require_transaction() -> None:
    if not connection.in_atomic_block:
        raise RuntimeError("a group's messages are stored in the caller's transaction")


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


def lock_group(mailboxes: Iterable[Mailbox], *, domains: bool = True) -> None:
    """Row-lock every mailbox of a group, then (unless ``domains`` is False, for a group whose
    domains are charged last: :class:`DomainChargesLast`) every domain, each in id order.

    Writers take a mailbox's row before its domain's (``append_message``, the POP3 UPDATE
    state). A group charging several mailboxes would otherwise take them in delivery order,
    with domain rows in between, and two groups (two LMTP workers, two hosts) could each hold
    a row the other waits for. One global order up front rules that deadlock out. Not needed
    for one mailbox, nor on SQLite, which has one writer at a time and no row locks.
    """
    mailboxes = list(mailboxes)
    mailbox_ids = sorted({mailbox.pk for mailbox in mailboxes})
    if len(mailbox_ids) < 2:
        return
    _lock_rows(fastsql.MAILBOX_TABLE, mailbox_ids)
    if domains:
        _lock_rows(fastsql.DOMAIN_TABLE, sorted({mailbox.domain_id for mailbox in mailboxes}))


def _lock_rows(table: str, ids: list[int]) -> None:
    """Row-lock ``ids`` of ``table`` in id order (PostgreSQL; SQLite has no row locks).

    ``FOR NO KEY UPDATE``, the lock the charges' UPDATEs take anyway: it still lets another
    transaction insert a row that refers to a locked one (a figures row for the domain). The ids
    go as one array, so the statement is the same (and prepared once) however many there are.
    """
    if not connection.features.has_select_for_update:
        return
    with fastsql.prepared_cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE", [ids])


@dataclass(frozen=True)
class _NewMessage:
    """A message row to insert, once its quota is charged, with the bytes of its chunks."""

    mailbox: Mailbox
    message: SpooledMessage
    prefix: bytes
    uidl: str
    mailbox_used_bytes: int
    envelope_sender: str
    received_at: datetime | None = None
    import_key: str | None = None

    COLUMNS = (
        "mailbox_id",
        "uidl",
        "size_bytes",
        "received_at",
        "envelope_sender",
        "header_size_bytes",
        "subject",
        "from_header",
        "import_key",
    )

    @classmethod
    def of(cls, copy: GroupCopy, charge: _Charge) -> "_NewMessage":
        uid, used_bytes = charge
        uidl = format_uidl(uid, copy.mailbox.uid_validity)
        return cls(copy.mailbox, copy.message, copy.prefix, uidl, used_bytes, copy.envelope_sender)

    @property
    def size_bytes(self) -> int:
        return len(self.prefix) + self.message.size_bytes

    def row(self) -> tuple:
        """The values of ``COLUMNS``."""
        return (
            self.mailbox.pk,
            self.uidl,
            self.size_bytes,
            self.received_at or timezone.now(),
            _storable(self.envelope_sender, "envelope_sender"),
            len(self.prefix) + self.message.header_size_bytes,
            _storable(self.message.summary.subject, "subject"),
            _storable(self.message.summary.from_header, "from_header"),
            self.import_key,
        )


def _insert_messages(new: Sequence[_NewMessage]) -> list[StoredMessage]:
    """The message rows (one INSERT) and their chunks, once their quota has been charged."""
    if not new:
        return []
    ids = fastsql.insert_returning_pks(Message, _NewMessage.COLUMNS, [message.row() for message in new])
    fastsql.write_chunks(
        (message_id, _prefixed(message.prefix, message.message))
        for message_id, message in zip(ids, new, strict=True)
    )
    return [
        StoredMessage(message_id, message.uidl, message.size_bytes, message.mailbox_used_bytes)
        for message_id, message in zip(ids, new, strict=True)
    ]


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
    with fastsql.prepared_cursor() as cursor:
        cursor.execute(
            fastsql.CHARGE_MAILBOX if enforce else fastsql.CHARGE_MAILBOX_UNCHECKED,
            {"size": size, "id": mailbox.pk, "uid_step": 0 if imported_uid is not None else 1},
        )
        row = cursor.fetchone()
    if row is None:
        raise OverQuota(gettext("mailbox %(address)s is over quota") % {"address": mailbox.address})
    with fastsql.prepared_cursor() as cursor:
        cursor.execute(
            fastsql.CHARGE_DOMAIN if enforce else fastsql.CHARGE_DOMAIN_UNCHECKED,
            {"size": size, "domain_id": mailbox.domain_id},
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
                used_bytes=F("used_bytes") - size,
                used_messages=F("used_messages") - count,
                changes=F("changes") + 1,
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
