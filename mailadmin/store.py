"""The mail store: the one module that writes mailboxes' messages, chunks and counters.

Invariants kept here (and checked by ``recalculate_quota``):

* a mailbox's ``used_bytes`` / ``used_messages`` equal the sum / count of its messages, and a
  domain's ``used_bytes`` the sum over its mailboxes, after every committed transaction;
* quota is charged by one conditional ``UPDATE`` per counter row (``used + size <= quota``) in
  the same transaction as the message insert, so concurrent deliveries can never overshoot,
  on PostgreSQL (row locks) and on SQLite (``BEGIN IMMEDIATE``) alike;
* UIDs come from ``Mailbox.next_uid`` in that same UPDATE, so a UIDL is never reused.
"""

import functools
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import get_hasher, identify_hasher
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import Count, DateTimeField, ExpressionWrapper, F, Sum
from django.db.models.expressions import Col
from django.db.models.functions import Now
from django.utils import timezone

from mailadmin.addresses import domain_of, normalise_address, normalise_domain
from mailadmin.messagefile import SpooledMessage
from mailadmin.models import Domain, Mailbox, MaildropLease, Message, MessageChunk

# A batch of ids small enough for SQLite's bound-parameter limit.
ID_BATCH_SIZE = 500
MAX_BIGINT = 2**63 - 1
MAX_INT32 = 2**31 - 1  # PositiveIntegerField on PostgreSQL
GENERATED_PASSWORD_BYTES = 18


class StoreError(Exception):
    """A request the store refuses; the message is fit to show an operator as it is."""


class DomainNotFound(StoreError):
    pass


class MailboxNotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class LimitReached(StoreError):
    pass


class OverQuota(StoreError):
    pass


class InvalidInput(StoreError):
    pass


# --- Domains and mailboxes -------------------------------------------------------------------


def create_domain(
    name: str, *, quota_bytes: int = 0, max_mailboxes: int = 0, default_mailbox_quota_bytes: int = 0
) -> Domain:
    domain_name = _checked(normalise_domain, name)
    _require_in_range(quota_bytes=quota_bytes, default_mailbox_quota_bytes=default_mailbox_quota_bytes)
    _require_in_range(MAX_INT32, max_mailboxes=max_mailboxes)
    try:
        with transaction.atomic():
            return Domain.objects.create(
                name=domain_name,
                quota_bytes=quota_bytes,
                max_mailboxes=max_mailboxes,
                default_mailbox_quota_bytes=default_mailbox_quota_bytes,
            )
    except IntegrityError:
        raise AlreadyExists(f"domain {domain_name} already exists") from None


def get_domain(name: str) -> Domain:
    domain_name = _checked(normalise_domain, name)
    try:
        return Domain.objects.get(name=domain_name)
    except Domain.DoesNotExist:
        raise DomainNotFound(f"no such domain: {domain_name}") from None


def get_mailbox(address: str) -> Mailbox:
    normalised = _checked(normalise_address, address)
    mailbox = find_mailbox(normalised)
    if mailbox is None:
        raise MailboxNotFound(f"no such mailbox: {normalised}")
    return mailbox


def find_mailbox(address: str) -> Mailbox | None:
    """The mailbox of a normalised address with its user and domain, or None: one plain query.

    What every delivery (LMTP's RCPT, then the store) asks first. The equivalent queryset
    (``select_related`` and ``first()``) spends about a millisecond compiling its SQL each
    time, half of an LMTP delivery's CPU; this SQL is built once, and the row is converted and
    turned into model instances (``Model.from_db``) the way a queryset loads it.
    """
    db = connections[DEFAULT_DB_ALIAS]
    lookup = _mailbox_lookup(db.vendor)
    with db.cursor() as cursor:
        cursor.execute(lookup.sql, [address])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, column in lookup.converted:
        for convert in db.ops.get_db_converters(column) + column.get_db_converters(db):
            values[index] = convert(values[index], column, db)
    instances = []
    for model, names in lookup.models:
        instances.append(model.from_db(db.alias, names, values[: len(names)]))
        values = values[len(names) :]
    mailbox, mailbox.user, mailbox.domain = instances
    return mailbox


@dataclass(frozen=True)
class _Lookup:
    sql: str
    models: list[tuple[type, list[str]]]  # each model with its fields' attnames, in column order
    converted: list[tuple[int, Col]]  # the columns whose values this backend converts


@functools.cache
def _mailbox_lookup(vendor: str) -> _Lookup:
    db = connections[DEFAULT_DB_ALIAS]
    tables = {alias: model for alias, model in zip("mud", (Mailbox, get_user_model(), Domain), strict=True)}
    columns = [
        field.get_col(alias) for alias, model in tables.items() for field in model._meta.concrete_fields
    ]
    quote = db.ops.quote_name
    selected = ", ".join(f"{column.alias}.{quote(column.target.column)}" for column in columns)
    mailbox, user, domain = (quote(model._meta.db_table) for model in tables.values())
    return _Lookup(
        sql=f"SELECT {selected} FROM {mailbox} m JOIN {user} u ON u.id = m.user_id "
        f"JOIN {domain} d ON d.id = m.domain_id WHERE u.username = %s",
        models=[
            (model, [field.attname for field in model._meta.concrete_fields]) for model in tables.values()
        ],
        converted=[
            (index, column)
            for index, column in enumerate(columns)
            if db.ops.get_db_converters(column) + column.get_db_converters(db)
        ],
    )


@dataclass(frozen=True)
class NewMailbox:
    mailbox: Mailbox
    generated_password: str | None


def create_mailbox(
    address: str,
    *,
    password: str | None = None,
    password_hash: str | None = None,
    quota_bytes: int | None = None,
    quota_messages: int = 0,
    create_domain: bool = False,
) -> NewMailbox:
    """Create the login user and its mailbox.

    With neither ``password`` nor ``password_hash`` a random password is generated and
    returned once in ``generated_password``. ``quota_bytes=None`` takes the domain's default.
    """
    normalised = _checked(normalise_address, address)
    if password is not None and password_hash is not None:
        raise InvalidInput("give a password or a password hash, not both")
    if password_hash is not None:
        check_password_hash(password_hash)
    generated = None
    if password is None and password_hash is None:
        generated = password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    if quota_bytes is not None:
        _require_in_range(quota_bytes=quota_bytes)
    _require_in_range(MAX_INT32, quota_messages=quota_messages)
    if password is not None:
        _validate_password(password, normalised)
    with transaction.atomic():
        domain = _domain_for_new_mailbox(domain_of(normalised), create_domain)
        user_model = get_user_model()
        if user_model.objects.filter(username=normalised).exists():
            raise AlreadyExists(f"mailbox {normalised} already exists")
        user = user_model(username=normalised, email=normalised)
        if password_hash is not None:
            user.password = password_hash
        else:
            user.set_password(password)
        user.save()
        mailbox = Mailbox.objects.create(
            user=user,
            domain=domain,
            quota_bytes=domain.default_mailbox_quota_bytes if quota_bytes is None else quota_bytes,
            quota_messages=quota_messages,
        )
    return NewMailbox(mailbox, generated)


def _domain_for_new_mailbox(domain_name: str, create_missing: bool) -> Domain:
    """The domain, row-locked so two concurrent creations cannot both take its last slot."""
    domain = Domain.objects.select_for_update().filter(name=domain_name).first()
    if domain is None:
        if not create_missing:
            raise DomainNotFound(f"no such domain: {domain_name} (create it first, or pass --create-domain)")
        domain = Domain.objects.create(name=domain_name)
    if domain.max_mailboxes and domain.mailboxes.count() >= domain.max_mailboxes:
        raise LimitReached(
            f"domain {domain_name} already has its maximum of {domain.max_mailboxes} mailboxes"
        )
    return domain


def check_password_hash(password_hash: str) -> None:
    """Raise InvalidInput unless one of the configured hashers understands ``password_hash``."""
    try:
        hasher = identify_hasher(password_hash)
        get_hasher(hasher.algorithm)
        hasher.decode(password_hash)
    except (ValueError, TypeError, KeyError, IndexError):
        raise InvalidInput("password hash is not in a format the configured hashers accept") from None


def set_password(address: str, password: str) -> None:
    mailbox = get_mailbox(address)
    _validate_password(password, mailbox.address)
    mailbox.user.set_password(password)
    mailbox.user.save(update_fields=["password"])


def set_quota(address: str, *, quota_bytes: int) -> Mailbox:
    _require_in_range(quota_bytes=quota_bytes)
    mailbox = get_mailbox(address)
    Mailbox.objects.filter(pk=mailbox.pk).update(quota_bytes=quota_bytes)
    mailbox.quota_bytes = quota_bytes
    return mailbox


def set_mailbox_active(address: str, active: bool) -> None:
    mailbox = get_mailbox(address)
    Mailbox.objects.filter(pk=mailbox.pk).update(active=active)


def delete_mailbox(address: str) -> int:
    """Delete a mailbox, its login and all its mail; return the number of messages removed."""
    mailbox = get_mailbox(address)
    with transaction.atomic():
        totals = Message.objects.filter(mailbox=mailbox).aggregate(count=Count("id"), size=Sum("size_bytes"))
        MessageChunk.objects.filter(message__mailbox=mailbox).delete()
        Message.objects.filter(mailbox=mailbox).only("id").delete()
        Domain.objects.filter(pk=mailbox.domain_id).update(used_bytes=F("used_bytes") - (totals["size"] or 0))
        mailbox.delete()
        get_user_model().objects.filter(pk=mailbox.user_id).delete()
    return totals["count"]


def mailbox_listing(domain_name: str | None = None) -> list[Mailbox]:
    mailboxes = Mailbox.objects.select_related("user", "domain").order_by("domain__name", "user__username")
    if domain_name is not None:
        mailboxes = mailboxes.filter(domain=get_domain(domain_name))
    return list(mailboxes)


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
        cursor.execute(_CHARGE_MAILBOX, charge)
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(_CHARGE_DOMAIN, {"size": size, "id": mailbox.domain_id})
        if cursor.rowcount != 1:
            cursor.execute(_UNCHARGE_MAILBOX, charge)  # its UID stays used: UIDs are never reused
            return None
    next_uid, used_bytes = row
    uidl = format_uidl(next_uid - 1, mailbox.uid_validity)
    return _insert_message(mailbox, message, prefix, uidl, used_bytes, envelope_sender)


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
        for table, ids in ((_MAILBOX_TABLE, mailbox_ids), (_DOMAIN_TABLE, domain_ids)):
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
    message_id = _insert_returning_pk(
        Message,
        mailbox_id=mailbox.pk,
        uidl=uidl,
        size_bytes=size,
        received_at=received_at or timezone.now(),
        envelope_sender=envelope_sender,
        headers=(prefix + message.headers)[: settings.MAILADMIN_HEADER_CACHE_BYTES],
        header_size_bytes=len(prefix) + message.header_size_bytes,
        subject=message.summary.subject,
        from_header=message.summary.from_header,
        import_key=import_key,
    )
    _write_chunks(message_id, _prefixed(prefix, message))
    return StoredMessage(message_id, uidl, size, mailbox_used_bytes)


def _insert_returning_pk(model: type, **values) -> int:
    """``model.objects.create(**values).pk`` without compiling the INSERT on every delivery.

    Values are prepared by their fields as the ORM would; the SQL is built once per model and
    set of columns. Only for models without save() logic or signals of their own.
    """
    db = connections[DEFAULT_DB_ALIAS]
    fields = [model._meta.get_field(name) for name in values]
    with db.cursor() as cursor:
        cursor.execute(
            _insert_sql(model, tuple(values), db.vendor),
            [field.get_db_prep_save(value, db) for field, value in zip(fields, values.values(), strict=True)],
        )
        return cursor.fetchone()[0]


@functools.cache
def _insert_sql(model: type, names: tuple[str, ...], vendor: str) -> str:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in names)
    placeholders = ", ".join(["%s"] * len(names))
    pk = quote(model._meta.pk.column)
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders}) RETURNING {pk}"


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
            _CHARGE_MAILBOX if enforce else _CHARGE_MAILBOX_UNCHECKED,
            {"size": size, "id": mailbox.pk, "uid_step": 0 if imported_uid is not None else 1},
        )
        row = cursor.fetchone()
    if row is None:
        raise OverQuota(f"mailbox {mailbox.address} is over quota")
    with connection.cursor() as cursor:
        cursor.execute(
            _CHARGE_DOMAIN if enforce else _CHARGE_DOMAIN_UNCHECKED, {"size": size, "id": mailbox.domain_id}
        )
        if cursor.rowcount != 1:
            raise OverQuota(f"domain of {mailbox.address} is over quota")
    next_uid, used_bytes = row
    return (imported_uid if imported_uid is not None else next_uid - 1), used_bytes


# One statement checks the quota, charges it and hands out the UID (SQLite 3.35+ and PostgreSQL
# both support RETURNING), so a delivery needs no second query to learn either.
_MAILBOX_TABLE = Mailbox._meta.db_table
_CHARGE = (
    f"UPDATE {_MAILBOX_TABLE} SET used_bytes = used_bytes + %(size)s, used_messages = used_messages + 1, "
    "next_uid = next_uid + %(uid_step)s WHERE id = %(id)s{condition} RETURNING next_uid, used_bytes"
)
_CHARGE_MAILBOX = _CHARGE.format(
    condition=" AND (quota_bytes = 0 OR used_bytes + %(size)s <= quota_bytes)"
    " AND (quota_messages = 0 OR used_messages < quota_messages)"
)
_CHARGE_MAILBOX_UNCHECKED = _CHARGE.format(condition="")
_UNCHARGE_MAILBOX = (
    f"UPDATE {_MAILBOX_TABLE} SET used_bytes = used_bytes - %(size)s, used_messages = used_messages - 1 "
    "WHERE id = %(id)s"
)
_DOMAIN_TABLE = Domain._meta.db_table
_CHARGE_DOMAIN_UNCHECKED = f"UPDATE {_DOMAIN_TABLE} SET used_bytes = used_bytes + %(size)s WHERE id = %(id)s"
_CHARGE_DOMAIN = f"{_CHARGE_DOMAIN_UNCHECKED} AND (quota_bytes = 0 OR used_bytes + %(size)s <= quota_bytes)"


def _prefixed(prefix: bytes, message: SpooledMessage) -> Iterator[bytes]:
    if prefix:
        yield prefix
    yield from message.chunks(settings.MAILADMIN_CHUNK_SIZE_BYTES)


def _write_chunks(message_id: int, pieces: Iterable[bytes]) -> None:
    """Re-cut ``pieces`` into chunk rows of exactly the configured size (the last may be shorter)."""
    chunk_size = settings.MAILADMIN_CHUNK_SIZE_BYTES
    buffer = bytearray()
    seq = 0
    with _chunk_cursor() as cursor:
        for piece in pieces:
            buffer += piece
            while len(buffer) >= chunk_size:
                cursor.execute(_INSERT_CHUNK, [message_id, seq, bytes(buffer[:chunk_size])])
                del buffer[:chunk_size]
                seq += 1
        if buffer:
            cursor.execute(_INSERT_CHUNK, [message_id, seq, bytes(buffer)])


def _chunk_cursor() -> CursorWrapper:
    """A cursor for chunk rows that keeps them out of DEBUG's query log.

    With DEBUG on, Django's cursor renders every statement with its parameters into a log of
    the last 9,000 queries: for ~256 KiB chunks that is gigabytes in a long-running process.
    """
    connection.ensure_connection()
    if connection.vendor == "postgresql":
        # Parameters bound on the server and results in binary: a chunk travels as its bytes,
        # not as hex text that PostgreSQL encodes and psycopg decodes (a third of the CPU).
        cursor = psycopg.Cursor(connection.connection)
        cursor.format = psycopg.pq.Format.BINARY
        return CursorWrapper(cursor, connection)
    return CursorWrapper(connection.create_cursor(), connection)


_CHUNK_TABLE = MessageChunk._meta.db_table
_INSERT_CHUNK = f"INSERT INTO {_CHUNK_TABLE} (message_id, seq, data) VALUES (%s, %s, %s)"
_SELECT_CHUNK = f"SELECT data FROM {_CHUNK_TABLE} WHERE message_id = %s AND seq = %s"
_SELECT_FIRST_CHUNKS = f"SELECT message_id, data FROM {_CHUNK_TABLE} WHERE seq = 0 AND message_id IN"


def validate_uidl(uidl: str) -> None:
    """RFC 1939 section 7: 1-70 characters in the range 0x21-0x7E; we also forbid '/'."""
    if not 1 <= len(uidl) <= 70 or any(not 0x21 <= ord(c) <= 0x7E or c == "/" for c in uidl):
        raise InvalidInput(f"invalid UIDL {uidl!r}: 1-70 printable characters without '/'")


def iter_message_bytes(message_id: int) -> Iterator[bytes]:
    """Yield a message's bytes chunk by chunk, one row in memory at a time."""
    seq = 0
    while (chunk := read_chunk(message_id, seq)) is not None:
        yield chunk
        seq += 1


def read_chunk(message_id: int, seq: int) -> bytes | None:
    """Chunk ``seq`` of a message, or None past its end (or when the message is gone)."""
    with _chunk_cursor() as cursor:
        cursor.execute(_SELECT_CHUNK, [message_id, seq])
        row = cursor.fetchone()
    return None if row is None else bytes(row[0])


def read_first_chunks(message_ids: Sequence[int]) -> dict[int, bytes]:
    """Chunk 0 of each message, in one query: the read-ahead of small messages for RETR.

    Messages that are gone are missing from the result.
    """
    placeholders = ", ".join(["%s"] * len(message_ids))
    with _chunk_cursor() as cursor:
        cursor.execute(f"{_SELECT_FIRST_CHUNKS} ({placeholders})", list(message_ids))
        return {message_id: bytes(data) for message_id, data in cursor.fetchall()}


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


# --- POP3 maildrops and leases ------------------------------------------------------------


class LeaseLost(StoreError):
    """The session no longer holds the mailbox lock (it lapsed and was taken over)."""


def _lease_expiry(ttl_seconds: float):
    return ExpressionWrapper(Now() + timedelta(seconds=ttl_seconds), output_field=DateTimeField())


def acquire_lease(mailbox_id: int, owner: str, node: str, ttl_seconds: float) -> bool:
    """Lock a mailbox for one POP3 session; False when another live session holds it.

    A lapsed lease is taken over with one conditional UPDATE; otherwise the INSERT either
    creates the lease or hits the unique mailbox and fails. Either way only one taker wins.
    """
    with transaction.atomic():
        taken_over = MaildropLease.objects.filter(mailbox_id=mailbox_id, expires_at__lt=Now()).update(
            owner=owner, node=node, acquired_at=Now(), expires_at=_lease_expiry(ttl_seconds)
        )
        if taken_over:
            return True
        try:
            with transaction.atomic():
                MaildropLease.objects.create(
                    mailbox_id=mailbox_id,
                    owner=owner,
                    node=node,
                    acquired_at=Now(),
                    expires_at=_lease_expiry(ttl_seconds),
                )
        except IntegrityError:
            return False
    return True


def renew_leases(owners: Iterable[str], ttl_seconds: float) -> int:
    """Heartbeat: push the expiry of the given leases forward; return how many still exist."""
    owners = list(owners)
    renewed = 0
    for start in range(0, len(owners), ID_BATCH_SIZE):
        batch = owners[start : start + ID_BATCH_SIZE]
        renewed += MaildropLease.objects.filter(owner__in=batch).update(expires_at=_lease_expiry(ttl_seconds))
    return renewed


def release_lease(owner: str) -> None:
    MaildropLease.objects.filter(owner=owner).delete()


def release_node_leases(node: str) -> int:
    """A stopping runpop3 gives back whatever its sessions still hold."""
    return MaildropLease.objects.filter(node=node).delete()[0]


def maildrop_snapshot(mailbox_id: int) -> list[tuple[int, int, str, int]]:
    """(message id, size, UIDL, header size) of every message, in POP3 order (delivery order).

    Plain SQL: at every login, and 100,000 rows through a queryset cost a third more.
    """
    with connection.cursor() as cursor:
        cursor.execute(_SNAPSHOT, [mailbox_id])
        return cursor.fetchall()


_SNAPSHOT = (
    f"SELECT id, size_bytes, uidl, header_size_bytes FROM {Message._meta.db_table} "
    "WHERE mailbox_id = %s ORDER BY id"
)


def commit_maildrop(mailbox_id: int, owner: str, message_ids: Iterable[int]) -> tuple[int, int]:
    """The POP3 UPDATE state: delete the messages if ``owner`` still holds the lock.

    The ownership check is an UPDATE of the lease row inside the same transaction as the
    deletions, so a lease taken over meanwhile makes the whole commit fail (LeaseLost) and
    nothing is removed.
    """
    with transaction.atomic():
        if not MaildropLease.objects.filter(mailbox_id=mailbox_id, owner=owner).update(
            acquired_at=F("acquired_at")
        ):
            raise LeaseLost(f"mailbox {mailbox_id}: the POP3 lock was lost before QUIT")
        mailbox = Mailbox.objects.get(pk=mailbox_id)
        return delete_messages(mailbox, message_ids)


# --- Quota recalculation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Drift:
    """A counter that disagreed with the stored messages, and the value it was corrected to."""

    subject: str
    counter: str
    recorded: int
    actual: int


def recalculate_quota(address: str | None = None) -> list[Drift]:
    """Recompute usage counters from the messages, correct them, and report what drifted."""
    if address is not None:
        mailboxes = [get_mailbox(address)]
    else:
        mailboxes = list(Mailbox.objects.select_related("user", "domain"))
    drifts: list[Drift] = []
    for mailbox in mailboxes:
        drifts += _recalculate_mailbox(mailbox.pk)
    domain_ids = {mailbox.domain_id for mailbox in mailboxes}
    if address is None:
        domain_ids |= set(Domain.objects.values_list("pk", flat=True))
    for domain_id in sorted(domain_ids):
        drifts += _recalculate_domain(domain_id)
    return drifts


def _recalculate_mailbox(mailbox_id: int) -> list[Drift]:
    with transaction.atomic():
        mailbox = Mailbox.objects.select_for_update().select_related("user").get(pk=mailbox_id)
        totals = Message.objects.filter(mailbox_id=mailbox_id).aggregate(
            count=Count("id"), size=Sum("size_bytes")
        )
        actual = {"used_bytes": totals["size"] or 0, "used_messages": totals["count"]}
        drifts = [
            Drift(mailbox.address, counter, getattr(mailbox, counter), value)
            for counter, value in actual.items()
            if getattr(mailbox, counter) != value
        ]
        if drifts:
            Mailbox.objects.filter(pk=mailbox_id).update(**actual)
    return drifts


def _recalculate_domain(domain_id: int) -> list[Drift]:
    with transaction.atomic():
        domain = Domain.objects.select_for_update().get(pk=domain_id)
        actual = (
            Message.objects.filter(mailbox__domain_id=domain_id).aggregate(size=Sum("size_bytes"))["size"]
            or 0
        )
        if domain.used_bytes == actual:
            return []
        Domain.objects.filter(pk=domain_id).update(used_bytes=actual)
    return [Drift(domain.name, "used_bytes", domain.used_bytes, actual)]


# --- Helpers ---------------------------------------------------------------------------------


def _checked(normalise, value: str) -> str:
    try:
        return normalise(value)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def _require_in_range(maximum: int = MAX_BIGINT, **values: int) -> None:
    for name, value in values.items():
        if not 0 <= value <= maximum:
            raise InvalidInput(f"{name.replace('_', ' ')} must be between 0 and {maximum}")


def _validate_password(password: str, address: str) -> None:
    """The configured AUTH_PASSWORD_VALIDATORS, for passwords an operator chooses."""
    user = get_user_model()(username=address, email=address)
    try:
        validate_password(password, user)
    except ValidationError as error:
        raise InvalidInput("password rejected: " + " ".join(error.messages)) from None


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
