"""The store's hot paths as plain, cached SQL: every delivery, login and RETR runs through here.

The ORM equivalents spend more time compiling SQL than the database spends running it (about a
millisecond per delivery); each statement here is built once per process and backend.
"""

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import psycopg
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.utils import CursorWrapper
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.expressions import Col
from django.db.models.functions import Now

from mailadmin.models import Domain, Mailbox, MaildropLease, Message, MessageChunk


def find_mailbox(address: str) -> Mailbox | None:
    """The mailbox of a normalised address with its user and domain, or None: one plain query.

    What every delivery (LMTP's RCPT, then the store) asks first. The equivalent queryset
    (``select_related`` and ``first()``) spends about a millisecond compiling its SQL each
    time, half of an LMTP delivery's CPU; this SQL is built once, and the row is converted and
    turned into model instances (``Model.from_db``) the way a queryset loads it.
    """
    found = _fetch_mailbox(_mailbox_lookup(connections[DEFAULT_DB_ALIAS].vendor), {"address": address})
    return None if found is None else found[0]


def find_recipient(address: str, size_bytes: int) -> tuple[Mailbox, bool] | None:
    """:func:`find_mailbox`, and whether a message of ``size_bytes`` fits in it now.

    The answer comes from the very conditions the charge applies (:func:`mailbox_fits`,
    :func:`domain_fits`), asked in the same one query: LMTP's RCPT refuses exactly what the
    store would refuse at that moment.
    """
    lookup = _mailbox_lookup(connections[DEFAULT_DB_ALIAS].vendor, fits=True)
    found = _fetch_mailbox(lookup, {"address": address, "size": size_bytes})
    return None if found is None else (found[0], bool(found[1][0]))


def _fetch_mailbox(lookup: "_Lookup", params: dict) -> tuple[Mailbox, tuple] | None:
    """The mailbox (with user and domain) of ``lookup``'s row, and the row's extra columns."""
    db = connections[DEFAULT_DB_ALIAS]
    values = fetch_converted_row(lookup.sql, params, lookup.converted)
    if values is None:
        return None
    instances = []
    for model, names in lookup.models:
        instances.append(model.from_db(db.alias, names, values[: len(names)]))
        values = values[len(names) :]
    mailbox, mailbox.user, mailbox.domain = instances
    return mailbox, tuple(values)


@dataclass(frozen=True)
class _Lookup:
    sql: str
    models: list[tuple[type, list[str]]]  # each model with its fields' attnames, in column order
    converted: list[tuple[int, Col]]  # the columns whose values this backend converts


@functools.cache
def _mailbox_lookup(vendor: str, fits: bool = False) -> _Lookup:
    db = connections[DEFAULT_DB_ALIAS]
    tables = {alias: model for alias, model in zip("mud", (Mailbox, get_user_model(), Domain), strict=True)}
    columns = [
        field.get_col(alias) for alias, model in tables.items() for field in model._meta.concrete_fields
    ]
    quote = db.ops.quote_name
    selected = ", ".join(f"{column.alias}.{quote(column.target.column)}" for column in columns)
    if fits:
        selected += f", CASE WHEN {mailbox_fits('m')} AND {domain_fits('d')} THEN 1 ELSE 0 END"
    mailbox, user, domain = (quote(model._meta.db_table) for model in tables.values())
    return _Lookup(
        sql=f"SELECT {selected} FROM {mailbox} m JOIN {user} u ON u.id = m.user_id "
        f"JOIN {domain} d ON d.id = m.domain_id WHERE u.username = %(address)s",
        models=[
            (model, [field.attname for field in model._meta.concrete_fields]) for model in tables.values()
        ],
        converted=converted_columns(columns),
    )


def converted_columns(columns: list[Col]) -> list[tuple[int, Col]]:
    """The columns (with their places in the row) whose values this backend converts on reading."""
    db = connections[DEFAULT_DB_ALIAS]
    return [
        (index, column)
        for index, column in enumerate(columns)
        if db.ops.get_db_converters(column) + column.get_db_converters(db)
    ]


def fetch_converted_row(sql: str, params, converted: list[tuple[int, Col]]) -> list | None:
    """The first row of ``sql`` with its values converted as a queryset would convert them."""
    db = connections[DEFAULT_DB_ALIAS]
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, column in converted:
        for convert in db.ops.get_db_converters(column) + column.get_db_converters(db):
            values[index] = convert(values[index], column, db)
    return values


def insert_returning_pk(model: type, **values) -> int:
    """``model.objects.create(**values).pk`` without compiling the INSERT on every delivery.

    Values are prepared by their fields as the ORM would; the SQL is built once per model and
    set of columns. Only for models without save() logic or signals of their own.
    """
    db = connections[DEFAULT_DB_ALIAS]
    fields = [model._meta.get_field(name) for name in values]
    with db.cursor() as cursor:
        cursor.execute(
            insert_sql(model, tuple(values), db.vendor),
            [field.get_db_prep_save(value, db) for field, value in zip(fields, values.values(), strict=True)],
        )
        return cursor.fetchone()[0]


@functools.cache
def insert_sql(model: type, names: tuple[str, ...], vendor: str) -> str:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in names)
    placeholders = ", ".join(["%s"] * len(names))
    pk = quote(model._meta.pk.column)
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES ({placeholders}) RETURNING {pk}"


def mailbox_fits(alias: str = "") -> str:
    """The quota rule, as SQL: a mailbox row has room for one more message of ``%(size)s`` bytes.

    A quota of 0 is no limit. Written once, for the charge (``CHARGE_MAILBOX``) and for the
    look-up before it (:func:`find_recipient`).
    """
    column = f"{alias}." if alias else ""
    return (
        f"({column}quota_bytes = 0 OR {column}used_bytes + %(size)s <= {column}quota_bytes)"
        f" AND ({column}quota_messages = 0 OR {column}used_messages < {column}quota_messages)"
    )


def domain_fits(alias: str = "") -> str:
    """The domain's cap, as SQL: its mailboxes together have room for ``%(size)s`` more bytes."""
    column = f"{alias}." if alias else ""
    return f"({column}quota_bytes = 0 OR {column}used_bytes + %(size)s <= {column}quota_bytes)"


# One statement checks the quota, charges it and hands out the UID (SQLite 3.35+ and PostgreSQL
# both support RETURNING), so a delivery needs no second query to learn either.
MAILBOX_TABLE = Mailbox._meta.db_table
CHARGE = (
    f"UPDATE {MAILBOX_TABLE} SET used_bytes = used_bytes + %(size)s, used_messages = used_messages + 1, "
    "next_uid = next_uid + %(uid_step)s WHERE id = %(id)s{condition} RETURNING next_uid, used_bytes"
)
CHARGE_MAILBOX = CHARGE.format(condition=f" AND {mailbox_fits()}")
CHARGE_MAILBOX_UNCHECKED = CHARGE.format(condition="")
UNCHARGE_MAILBOX = (
    f"UPDATE {MAILBOX_TABLE} SET used_bytes = used_bytes - %(size)s, used_messages = used_messages - 1 "
    "WHERE id = %(id)s"
)
DOMAIN_TABLE = Domain._meta.db_table
CHARGE_DOMAIN_UNCHECKED = f"UPDATE {DOMAIN_TABLE} SET used_bytes = used_bytes + %(size)s WHERE id = %(id)s"
CHARGE_DOMAIN = f"{CHARGE_DOMAIN_UNCHECKED} AND {domain_fits()}"


def write_chunks(message_id: int, pieces: Iterable[bytes]) -> None:
    """Re-cut ``pieces`` into chunk rows of exactly the configured size (the last may be shorter)."""
    chunk_size = settings.MAILADMIN_CHUNK_SIZE_BYTES
    buffer = bytearray()
    seq = 0
    with chunk_cursor() as cursor:
        for piece in pieces:
            buffer += piece
            while len(buffer) >= chunk_size:
                cursor.execute(INSERT_CHUNK, [message_id, seq, bytes(buffer[:chunk_size])])
                del buffer[:chunk_size]
                seq += 1
        if buffer:
            cursor.execute(INSERT_CHUNK, [message_id, seq, bytes(buffer)])


def chunk_cursor(health_check: bool = True) -> CursorWrapper:
    """A cursor for chunk rows that keeps them out of DEBUG's query log.

    With DEBUG on, Django's cursor renders every statement with its parameters into a log of
    the last 9,000 queries: for ~256 KiB chunks that is gigabytes in a long-running process.

    The connection is health-checked first, as Django's own ``cursor()`` does: a connection
    the server dropped (a PostgreSQL restart) is replaced here instead of failing this read.
    Without ``health_check`` a dropped connection fails the read instead (and is replaced after
    it, as after any error): on PostgreSQL the check is a round trip of its own.
    """
    if health_check:
        connection.close_if_health_check_failed()
    connection.ensure_connection()
    if connection.vendor == "postgresql":
        # Parameters bound on the server and results in binary: a chunk travels as its bytes,
        # not as hex text that PostgreSQL encodes and psycopg decodes (a third of the CPU).
        cursor = psycopg.Cursor(connection.connection)
        cursor.format = psycopg.pq.Format.BINARY
        return CursorWrapper(cursor, connection)
    return CursorWrapper(connection.create_cursor(), connection)


CHUNK_TABLE = MessageChunk._meta.db_table
INSERT_CHUNK = f"INSERT INTO {CHUNK_TABLE} (message_id, seq, data) VALUES (%s, %s, %s)"
SELECT_CHUNK = f"SELECT data FROM {CHUNK_TABLE} WHERE message_id = %s AND seq = %s"
SELECT_FIRST_CHUNKS = f"SELECT message_id, data FROM {CHUNK_TABLE} WHERE seq = 0 AND message_id IN"


def read_chunk(message_id: int, seq: int) -> bytes | None:
    """Chunk ``seq`` of a message, or None past its end (or when the message is gone)."""
    with chunk_cursor() as cursor:
        cursor.execute(SELECT_CHUNK, [message_id, seq])
        row = cursor.fetchone()
    return None if row is None else bytes(row[0])


def read_first_chunks(message_ids: Sequence[int], health_check: bool = True) -> dict[int, bytes]:
    """Chunk 0 of each message, in one query: RETR's read-ahead.

    Messages that are gone are missing from the result. ``health_check``: see
    :func:`chunk_cursor`; a read ahead goes without, since the RETR that needs a read that
    failed reads it again, checked.
    """
    placeholders = ", ".join(["%s"] * len(message_ids))
    with chunk_cursor(health_check) as cursor:
        cursor.execute(f"{SELECT_FIRST_CHUNKS} ({placeholders})", list(message_ids))
        return {message_id: bytes(data) for message_id, data in cursor.fetchall()}


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


def lease_expiry(ttl_seconds: float) -> ExpressionWrapper:
    """When a lease taken or renewed now lapses, by the database's clock."""
    return ExpressionWrapper(Now() + timedelta(seconds=ttl_seconds), output_field=DateTimeField())


def take_lease(mailbox_id: int, owner: str, node: str, ttl_seconds: float) -> bool:
    """Insert the mailbox's lease, or take over a lapsed one: one statement, its SQL built once.

    False when a live lease holds the mailbox (the conflict's UPDATE finds it unexpired).
    """
    sql, params = _take_lease_sql(connection.vendor, ttl_seconds)
    with connection.cursor() as cursor:
        cursor.execute(sql, [mailbox_id, owner, node, *params])
        return cursor.rowcount == 1


@functools.cache
def _take_lease_sql(vendor: str, ttl_seconds: float) -> tuple[str, tuple]:
    """The statement and its trailing parameters, with the clock's SQL as Django writes it."""
    query = MaildropLease.objects.none().query
    compiler = query.get_compiler(connection=connection)
    now, now_params = compiler.compile(Now())
    expiry, expiry_params = compiler.compile(lease_expiry(ttl_seconds).resolve_expression(query))
    table = connection.ops.quote_name(LEASE_TABLE)
    sql = (
        f"INSERT INTO {table} (mailbox_id, owner, node, acquired_at, expires_at) "
        f"VALUES (%s, %s, %s, {now}, {expiry}) ON CONFLICT (mailbox_id) DO UPDATE SET "
        "owner = excluded.owner, node = excluded.node, acquired_at = excluded.acquired_at, "
        f"expires_at = excluded.expires_at WHERE {table}.expires_at < {now}"
    )
    return sql, (*now_params, *expiry_params, *now_params)


LEASE_TABLE = MaildropLease._meta.db_table
RELEASE_LEASE = f"DELETE FROM {LEASE_TABLE} WHERE owner = %s"
