"""The store's hot paths as plain, cached SQL: every delivery, login and RETR runs through here.

The ORM equivalents spend more time compiling SQL than the database spends running it (about a
millisecond per delivery); each statement here is built once per process and backend.
"""

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.utils import CursorWrapper
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.expressions import Col
from django.db.models.functions import Now

from mailadmin.models import (
    DeliveryFigures,
    Domain,
    Mailbox,
    MaildropLease,
    Message,
    MessageChunk,
    Pop3Session,
)

# A column whose values this backend converts on reading: its place in the row, the column, and
# its converters (as a queryset's compiler finds them, once per query it compiles; here once).
ConvertedColumn = tuple[int, Col, tuple[Callable, ...]]


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
    lookup = recipient_lookup()
    found = _fetch_mailbox(lookup, {"address": address, "size": size_bytes})
    return None if found is None else recipient_of(found)


def recipient_lookup() -> "_Lookup":
    """The query of :func:`find_recipient` (parameters ``address`` and ``size``)."""
    return _mailbox_lookup(connections[DEFAULT_DB_ALIAS].vendor, fits=True)


def recipient_of(found: tuple[Mailbox, tuple]) -> tuple[Mailbox, bool]:
    """:func:`find_recipient`'s answer from a row of :func:`recipient_lookup`."""
    mailbox, extra = found
    return mailbox, bool(extra[0])


def _fetch_mailbox(lookup: "_Lookup", params: dict) -> tuple[Mailbox, tuple] | None:
    """The mailbox (with user and domain) of ``lookup``'s row, and the row's extra columns."""
    values = fetch_converted_row(lookup.sql, params, lookup.converted)
    return None if values is None else mailbox_of_row(lookup, values)


def mailbox_of_row(lookup: "_Lookup", values: list) -> tuple[Mailbox, tuple]:
    """The mailbox (with user and domain) of a row of ``lookup``, its values converted, and the
    row's extra columns: as a queryset turns rows into instances (``Model.from_db``)."""
    db = connections[DEFAULT_DB_ALIAS]
    instances = []
    for model, names in lookup.models:
        instances.append(model.from_db(db.alias, names, values[: len(names)]))
        values = values[len(names) :]
    mailbox, mailbox.user, mailbox.domain = instances
    return mailbox, tuple(values)


def lock_domain(name: str) -> Domain | None:
    """The domain named ``name``, row-locked until the transaction ends (``SELECT ... FOR
    UPDATE`` where the database has it; SQLite's write transaction already excludes other
    writers), or None: what ``Domain.objects.select_for_update().filter(name=name).first()``
    gives, with its SQL built once. A mailbox ``PUT`` asks it inside its write transaction."""
    db = connections[DEFAULT_DB_ALIAS]
    sql, names, converted = _domain_lock(db.vendor)
    values = fetch_converted_row(sql, [name], converted)
    return None if values is None else Domain.from_db(db.alias, names, values)


@functools.cache
def _domain_lock(vendor: str) -> tuple[str, list[str], list[ConvertedColumn]]:
    db = connections[DEFAULT_DB_ALIAS]
    fields = Domain._meta.concrete_fields
    quote = db.ops.quote_name
    selected = ", ".join(quote(field.column) for field in fields)
    lock = " FOR UPDATE" if db.features.has_select_for_update else ""
    name = quote(Domain._meta.get_field("name").column)
    sql = f"SELECT {selected} FROM {quote(Domain._meta.db_table)} WHERE {name} = %s{lock}"
    columns = [field.get_col(Domain._meta.db_table) for field in fields]
    return sql, [field.attname for field in fields], converted_columns(columns)


@dataclass(frozen=True)
class _Lookup:
    sql: str
    models: list[tuple[type, list[str]]]  # each model with its fields' attnames, in column order
    converted: list[ConvertedColumn]  # the columns whose values this backend converts


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


def converted_columns(columns: list[Col]) -> list[ConvertedColumn]:
    """The columns (with their places in the row) whose values this backend converts on reading.

    Each converter takes the connection it converts for, so the ones found here, on one
    thread's connection, serve every thread's (their own state is the settings')."""
    db = connections[DEFAULT_DB_ALIAS]
    found = [
        (index, column, tuple(db.ops.get_db_converters(column) + column.get_db_converters(db)))
        for index, column in enumerate(columns)
    ]
    return [(index, column, converters) for index, column, converters in found if converters]


def fetch_converted_row(sql: str, params, converted: list[ConvertedColumn]) -> list | None:
    """The first row of ``sql`` with its values converted as a queryset would convert them."""
    with prepared_cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else converted_row(row, converted)


def converted_row(row: Sequence, converted: list[ConvertedColumn]) -> list:
    """A row's values converted as a queryset would convert them."""
    db = connections[DEFAULT_DB_ALIAS]
    values = list(row)
    for index, column, converters in converted:
        for convert in converters:
            values[index] = convert(values[index], column, db)
    return values


def insert_returning_pks(model: type, names: tuple[str, ...], rows: Sequence[Sequence]) -> list[int]:
    """Insert ``rows`` (values for the fields ``names``) in one statement; their pks, in row order.

    ``bulk_create`` without compiling the INSERT each time: values are prepared by their fields
    as the ORM would, and the SQL is built once per model, columns and number of rows. The pks
    come from ``RETURNING`` in row order, which ``bulk_create`` relies on as well on both
    backends. Only for models without save() logic or signals of their own.
    """
    db = connections[DEFAULT_DB_ALIAS]
    fields = [model._meta.get_field(name) for name in names]
    params = [
        field.get_db_prep_save(value, db) for row in rows for field, value in zip(fields, row, strict=True)
    ]
    with prepared_cursor() as cursor:
        cursor.execute(insert_sql(model, names, db.vendor, len(rows)), params)
        return [pk for (pk,) in cursor.fetchall()]


@functools.lru_cache(maxsize=256)
def insert_sql(model: type, names: tuple[str, ...], vendor: str, rows: int, returning: bool = True) -> str:
    """The INSERT of ``rows`` rows; ``RETURNING`` their pks, or else skipping a row whose unique
    key is taken (``ON CONFLICT DO NOTHING``, on SQLite as well: only a uniqueness conflict is
    skipped, where the ORM's ``INSERT OR IGNORE`` would skip a NOT NULL violation too)."""
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    columns = ", ".join(quote(model._meta.get_field(name).column) for name in names)
    table, pk = quote(model._meta.db_table), quote(model._meta.pk.column)
    ending = f"RETURNING {pk}" if returning else "ON CONFLICT DO NOTHING"
    return f"INSERT INTO {table} ({columns}) VALUES {values_sql(rows, len(names))} {ending}"


def insert_ignoring_conflicts(model: type, names: tuple[str, ...], rows: Sequence[Sequence]) -> None:
    """``bulk_create(ignore_conflicts=True)`` without compiling the INSERT each time: ``rows``
    (values for the fields ``names``) by one single-row statement run for each (so one prepared
    statement on PostgreSQL, however many rows), each row whose unique key is taken skipped.
    Only for models without save() logic or signals of their own."""
    db = connections[DEFAULT_DB_ALIAS]
    fields = [model._meta.get_field(name) for name in names]
    params = [
        [field.get_db_prep_save(value, db) for field, value in zip(fields, row, strict=True)] for row in rows
    ]
    with prepared_cursor() as cursor:
        cursor.executemany(insert_sql(model, names, db.vendor, 1, returning=False), params)


@functools.lru_cache(maxsize=256)
def values_sql(rows: int, columns: int) -> str:
    """``(%s, %s), (%s, %s)``: the placeholders of ``rows`` rows of ``columns`` values."""
    row = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([row] * rows)


def mailbox_fits(alias: str = "", size: str = "%(size)s", messages: str = "1") -> str:
    """The quota rule, as SQL: a mailbox row has room for ``messages`` more of ``size`` bytes in all.

    A quota of 0 is no limit. Written once, for the charges (``CHARGE_MAILBOX``,
    :func:`charge_mailboxes`) and for the look-up before them (:func:`find_recipient`).
    """
    column = f"{alias}." if alias else ""
    return (
        f"({column}quota_bytes = 0 OR {column}used_bytes + {size} <= {column}quota_bytes)"
        f" AND ({column}quota_messages = 0 OR {column}used_messages + {messages} <= {column}quota_messages)"
    )


def domain_fits(alias: str = "", size: str = "%(size)s") -> str:
    """The domain's cap, as SQL: its mailboxes together have room for ``size`` more bytes."""
    column = f"{alias}." if alias else ""
    return f"({column}quota_bytes = 0 OR {column}used_bytes + {size} <= {column}quota_bytes)"


# One statement checks the quota, charges it and hands out the UID (SQLite 3.35+ and PostgreSQL
# both support RETURNING), so a delivery needs no second query to learn either.
MAILBOX_TABLE = Mailbox._meta.db_table
CHARGE = (
    f"UPDATE {MAILBOX_TABLE} SET used_bytes = used_bytes + %(size)s, used_messages = used_messages + 1, "
    "next_uid = next_uid + %(uid_step)s, changes = changes + 1 WHERE id = %(id)s{condition} "
    "RETURNING next_uid, used_bytes"
)
CHARGE_MAILBOX = CHARGE.format(condition=f" AND {mailbox_fits()}")
CHARGE_MAILBOX_UNCHECKED = CHARGE.format(condition="")
# ``uids``: how many of the UIDs the charge took go back; only those no UIDL was made from.
UNCHARGE_MAILBOX = (
    f"UPDATE {MAILBOX_TABLE} SET used_bytes = used_bytes - %(size)s, "
    "used_messages = used_messages - %(messages)s, next_uid = next_uid - %(uids)s WHERE id = %(id)s"
)
DOMAIN_TABLE = Domain._meta.db_table
CHARGE_DOMAIN_UNCHECKED = (
    f"UPDATE {DOMAIN_TABLE} SET used_bytes = used_bytes + %(size)s WHERE id = %(domain_id)s"
)
CHARGE_DOMAIN = f"{CHARGE_DOMAIN_UNCHECKED} AND {domain_fits()}"

# A group's charges, one statement per table: each row of ``charge`` (made of VALUES, the SQL
# both databases accept for ``UPDATE ... FROM``) is charged only if all of it fits.
CHARGE_MAILBOXES = (
    "WITH charge (mailbox_id, add_bytes, add_messages) AS (VALUES {values}) "
    f"UPDATE {MAILBOX_TABLE} SET used_bytes = used_bytes + add_bytes, "
    "used_messages = used_messages + add_messages, next_uid = next_uid + add_messages, changes = changes + 1 "
    f"FROM charge WHERE id = mailbox_id AND {mailbox_fits(size='add_bytes', messages='add_messages')} "
    "RETURNING id, next_uid, used_bytes"
)
CHARGE_DOMAINS = (
    "WITH charge (domain_id, add_bytes) AS (VALUES {values}) "
    f"UPDATE {DOMAIN_TABLE} SET used_bytes = used_bytes + add_bytes "
    f"FROM charge WHERE id = domain_id AND {domain_fits(size='add_bytes')} RETURNING id"
)


def charge_mailboxes(charges: Sequence[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    """Charge each ``(mailbox id, bytes, messages)`` that fits whole, taking a UID per message.

    Returns, per mailbox charged, its ``next_uid`` and ``used_bytes`` after the charge; a
    mailbox missing from it was left as it was (no room for all of it, or gone).
    """
    if not charges:
        return {}
    with prepared_cursor() as cursor:
        cursor.execute(CHARGE_MAILBOXES.format(values=values_sql(len(charges), 3)), _flat(charges))
        return {mailbox_id: (next_uid, used_bytes) for mailbox_id, next_uid, used_bytes in cursor.fetchall()}


def charge_domains(charges: Sequence[tuple[int, int]]) -> set[int]:
    """Charge each ``(domain id, bytes)`` that fits whole; the ids of the domains charged."""
    if not charges:
        return set()
    with prepared_cursor() as cursor:
        cursor.execute(CHARGE_DOMAINS.format(values=values_sql(len(charges), 2)), _flat(charges))
        return {domain_id for (domain_id,) in cursor.fetchall()}


@dataclass(frozen=True)
class LoneCopy:
    """What :func:`store_lone_copy` stores: one message row (``fields``: the values of the
    message's columns but its UIDL, by field name), its bytes (one chunk at most), and the hour
    of the delivery figures it is counted in."""

    mailbox_id: int
    domain_id: int
    uid_validity: int
    fields: dict[str, object]
    data: bytes
    hour: datetime


@dataclass(frozen=True)
class LoneCopyStored:
    message_id: int
    uid: int
    used_bytes: int  # the mailbox's, after the charge


def stores_lone_copies() -> bool:
    """Whether :func:`store_lone_copy` can be used: PostgreSQL (SQLite has no writes in WITH)."""
    return connection.vendor == "postgresql"


def store_lone_copy(copy: LoneCopy) -> LoneCopyStored | None:
    """Store a delivery of one copy whole in one statement, committed on its own: the mailbox
    and domain charged, the message row and its chunk inserted, the copy counted in the
    delivery figures. None, with nothing written, when the mailbox or the domain has no room
    (or the mailbox is gone).

    What a group's transaction does in seven round trips for one copy, the usual LMTP
    delivery on PostgreSQL (BEGIN, the mailbox's charge, the two INSERTs, the domain's charge,
    the figures, COMMIT): on a busy machine each one costs both processes a wake-up. Outside a
    transaction (autocommit) the statement is its own; inside one, it is part of the caller's.
    """
    with prepared_cursor() as cursor:
        cursor.execute(*lone_copy_statement(copy))
        row = cursor.fetchone()
    return None if row is None else LoneCopyStored(*row)


def lone_copy_statement(copy: LoneCopy) -> tuple[str, dict]:
    """The SQL and parameters of :func:`store_lone_copy`; a row of it is a :class:`LoneCopyStored`."""
    return _lone_copy_sql(tuple(copy.fields)), {
        **copy.fields,
        "id": copy.mailbox_id,
        "domain_id": copy.domain_id,
        "size": copy.fields["size_bytes"],
        "uid_step": 1,
        "uid_validity": copy.uid_validity,
        "data": copy.data,
        "hour": copy.hour,
        "outcome": DeliveryFigures.DELIVERED,
    }


@functools.lru_cache(maxsize=8)
def _lone_copy_sql(names: tuple[str, ...]) -> str:
    """The statement of :func:`store_lone_copy` for message fields ``names``.

    Each step reads the one before it, so they run in this order, and each only if the one
    before it found room: the mailbox's row locked first (as every writer takes it before its
    domain's) and found to have room, the domain charged, the mailbox charged, the rows
    inserted, the copy counted. A domain without room so leaves nothing to undo. The UIDL is
    :func:`~mailadmin.hosting.store.messages.format_uidl` in SQL: the UID in upper-case
    hexadecimal, zero-padded to eight digits (never cut), then the validity's.
    """
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    fields = [Message._meta.get_field(name) for name in names]
    columns = ", ".join(quote(field.column) for field in (*fields, Message._meta.get_field("uidl")))
    values = ", ".join(f"%({name})s" for name in names)
    uidl = f"{_hex8_sql('charged.next_uid - 1')} || {_hex8_sql('%(uid_validity)s::bigint')}"
    counted = counter_upsert_sql(
        DeliveryFigures,
        ("hour", "outcome"),
        ("messages", "size_bytes"),
        "SELECT %(hour)s, %(domain_id)s, %(outcome)s, 1, %(size)s FROM message",
        with_domain=True,
    )
    return (
        f"WITH room AS MATERIALIZED (SELECT id FROM {MAILBOX_TABLE} "
        f"WHERE id = %(id)s AND {mailbox_fits()} FOR NO KEY UPDATE), "
        f"domain_charged AS ({CHARGE_DOMAIN} AND EXISTS (SELECT FROM room) RETURNING id), "
        f"charged AS ({CHARGE.format(condition=' AND EXISTS (SELECT FROM domain_charged)')}), "
        f"message AS (INSERT INTO {quote(Message._meta.db_table)} ({columns}) "
        f"SELECT {values}, {uidl} FROM charged RETURNING id), "
        f"chunk AS (INSERT INTO {CHUNK_TABLE} (message_id, seq, data) SELECT id, 0, %(data)s FROM message), "
        f"counted AS ({counted}) "
        "SELECT message.id, charged.next_uid - 1, charged.used_bytes FROM charged, message"
    )


def _hex8_sql(number: str) -> str:
    """``f"{number:08X}"`` in PostgreSQL's SQL."""
    return f"lpad(upper(to_hex({number})), greatest(8, length(to_hex({number}))), '0')"


def counter_upsert_sql(
    model: type, key: tuple[str, ...], columns: tuple[str, ...], rows: str, *, with_domain: bool
) -> str:
    """An INSERT adding ``rows`` to ``model``'s hourly counters: each row (hour, domain id, the
    rest of ``key``, then ``columns``; VALUES or a SELECT) is added to the row of its key.

    A row with a domain meets one partial unique index, a row without one the other (a NULL
    never conflicts in a plain index): ``with_domain`` says which ``rows`` are.
    """
    table = connections[DEFAULT_DB_ALIAS].ops.quote_name(model._meta.db_table)
    names = ", ".join(("hour", "domain_id", *key[1:], *columns))
    increments = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in columns)
    if with_domain:
        target, condition = ", ".join(("hour", "domain_id", *key[1:])), "domain_id IS NOT NULL"
    else:
        target, condition = ", ".join(key), "domain_id IS NULL"
    return (
        f"INSERT INTO {table} ({names}) {rows} "
        f"ON CONFLICT ({target}) WHERE {condition} DO UPDATE SET {increments}"
    )


def _flat(rows: Iterable[Sequence]) -> list:
    return [value for row in rows for value in row]


def write_chunks(messages: Iterable[tuple[int, Iterable[bytes]]]) -> None:
    """Cut each ``(message id, pieces)`` into chunk rows of exactly the configured size (a
    message's last may be shorter), several rows per INSERT: rows wait for a statement until
    they hold a chunk's worth of bytes, so a group of small messages is one statement and a
    large message still one chunk per statement."""
    chunk_size = settings.MAILADMIN_CHUNK_SIZE_BYTES
    waiting: list[tuple[int, int, bytes]] = []
    waiting_bytes = 0
    with chunk_cursor() as cursor:
        for message_id, pieces in messages:
            for seq, data in enumerate(_cut(pieces, chunk_size)):
                waiting.append((message_id, seq, data))
                waiting_bytes += len(data)
                if waiting_bytes >= chunk_size:
                    _insert_chunks(cursor, waiting)
                    waiting, waiting_bytes = [], 0
        if waiting:
            _insert_chunks(cursor, waiting)


def _cut(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """``pieces`` joined and cut again into parts of ``size`` bytes; the last may be shorter (not empty)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _insert_chunks(cursor: CursorWrapper, rows: list[tuple[int, int, bytes]]) -> None:
    cursor.execute(f"{INSERT_CHUNKS} {values_sql(len(rows), 3)}", _flat(rows))


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
        # Results in binary: a chunk travels as its bytes, not as hex text that PostgreSQL
        # encodes and psycopg decodes (a third of the CPU).
        cursor = _server_binding_cursor()
        cursor.format = psycopg.pq.Format.BINARY
        return CursorWrapper(cursor, connection)
    return CursorWrapper(connection.create_cursor(), connection)


def prepared_cursor() -> CursorWrapper:
    """``connection.cursor()`` for the store's hot statements: on PostgreSQL, one that binds
    parameters on the server, so psycopg prepares a statement once it has run a few times on
    the connection (``DATABASE_PREPARE_THRESHOLD``) and PostgreSQL stops parsing and planning
    it at every run.

    Django's cursors bind on the client, and a statement whose values are written into its
    text can never be prepared: planning was half of PostgreSQL's CPU for an LMTP delivery
    (a three-table join at RCPT, the charges, the inserts and the figures; 1.0 ms a delivery
    before, 0.55 ms prepared). Only for SQL of our own whose parameters PostgreSQL can type
    from where they stand (a column, an operator with a typed side). DEBUG's query log shows
    these statements with ``$1``-style placeholders. SQLite: Django's cursor (sqlite3 keeps its
    own cache of compiled statements).
    """
    if connection.vendor != "postgresql":
        return connection.cursor()
    connection.close_if_health_check_failed()  # what connection.cursor() does first
    connection.ensure_connection()
    cursor = _server_binding_cursor()
    if connection.queries_logged:
        return connection.make_debug_cursor(cursor)
    return connection.make_cursor(cursor)


def _server_binding_cursor() -> psycopg.Cursor:
    """A psycopg cursor on Django's connection that binds parameters on the server: prepared
    after ``prepare_threshold`` runs, which client-side binding (Django's cursors) never is."""
    return _PreparingCursor(connection.connection)


class _PreparingCursor(psycopg.Cursor):
    """A server-binding cursor that gives its connection up when a prepared statement has gone
    stale.

    A migration that changes the type of a column a prepared statement returns (a longer
    varchar, say) makes PostgreSQL refuse to run it ("cached plan must not change result type").
    psycopg forgets its prepared statements only on a rollback, so outside a transaction (a
    look-up at RCPT or login, in autocommit) the statement would fail at every run for as long
    as the connection lived. Closed instead, the connection is replaced before the next unit of
    work (``close_old_connections``, as after any error): one unit fails, as one in a
    transaction does.
    """

    def execute(self, query, params=None, **kwargs):
        try:
            return super().execute(query, params, **kwargs)
        except psycopg.errors.FeatureNotSupported as error:
            if STALE_PLAN in str(error):
                self.connection.close()
            raise


STALE_PLAN = "cached plan must not change result type"


CHUNK_TABLE = MessageChunk._meta.db_table
INSERT_CHUNKS = f"INSERT INTO {CHUNK_TABLE} (message_id, seq, data) VALUES"
SELECT_CHUNK = f"SELECT data FROM {CHUNK_TABLE} WHERE message_id = %s AND seq = %s"
SELECT_CHUNKS = (
    f"SELECT seq, data FROM {CHUNK_TABLE} WHERE message_id = %s AND seq >= %s AND seq < %s ORDER BY seq"
)
SELECT_FIRST_CHUNKS = f"SELECT message_id, data FROM {CHUNK_TABLE} WHERE seq = 0 AND message_id IN"


def read_chunk(message_id: int, seq: int) -> bytes | None:
    """Chunk ``seq`` of a message, or None past its end (or when the message is gone)."""
    with chunk_cursor() as cursor:
        cursor.execute(SELECT_CHUNK, [message_id, seq])
        row = cursor.fetchone()
    return None if row is None else bytes(row[0])


def read_chunks(message_id: int, first_seq: int, count: int) -> list[bytes]:
    """Chunks ``first_seq`` to ``first_seq + count - 1`` of a message, in one query: fewer at
    its end (or before a missing one, never after it), none when the message is gone. RETR of
    a long message reads on this way."""
    chunks: list[bytes] = []
    with chunk_cursor() as cursor:
        cursor.execute(SELECT_CHUNKS, [message_id, first_seq, first_seq + count])
        for seq, data in cursor.fetchall():
            if seq != first_seq + len(chunks):
                break
            chunks.append(bytes(data))
    return chunks


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
    with prepared_cursor() as cursor:
        cursor.execute(_SNAPSHOT, [mailbox_id])
        return cursor.fetchall()


def maildrop_version(mailbox_id: int) -> tuple[int, int] | None:
    """(uid_validity, changes) of a mailbox, or None if it is gone: what moves whenever its
    messages change (``mailadmin.pop3d.snapshots``)."""
    with prepared_cursor() as cursor:
        cursor.execute(_VERSION, [mailbox_id])
        return cursor.fetchone()


_VERSION = f"SELECT uid_validity, changes FROM {MAILBOX_TABLE} WHERE id = %s"

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
    with prepared_cursor() as cursor:
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

# --- POP3 session rows ---------------------------------------------------------------------

SESSION_TABLE = Pop3Session._meta.db_table
# Keys of a session row's update that the statement itself resolves (:func:`update_session_row`).
TRIED_DOMAIN = "tried_domain"
MAILBOX_ID = "mailbox_id"


def insert_session_rows(rows: list[dict]) -> None:
    """New session rows (field name to value; the others take their defaults, as
    ``bulk_create`` gives them), skipping those already written: a tick that failed after its
    commit queues its rows again."""
    # Asked at every call, not kept: a field's default may be a callable (a time, say).
    defaults = {field.attname: field.get_default() for field in _session_insert_fields()}
    values = [[row.get(name, default) for name, default in defaults.items()] for row in rows]
    insert_ignoring_conflicts(Pop3Session, tuple(defaults), values)


@functools.cache
def _session_insert_fields() -> tuple:
    """The fields of a session row that the INSERT names (``updated_at``, left out, takes the
    database's clock)."""
    return tuple(field for field in Pop3Session._meta.concrete_fields if not field.has_db_default())


def update_session_row(session_id: str, fields: dict) -> None:
    """``Pop3Session.objects.filter(pk=session_id).update(**fields, updated_at=Now())``, its SQL
    built once per set of field names: what runpop3's monitor writes for every session.

    Two keys are resolved by the statement: ``tried_domain``, a name, sets the row's domain to
    ours of that name (NULL if it is not ours); ``mailbox_id`` sets the mailbox and the domain
    from the mailbox's row, both NULL for a mailbox deleted since the login (its domain wins
    over one tried before).
    """
    db = connections[DEFAULT_DB_ALIAS]
    if MAILBOX_ID in fields:
        fields = {name: value for name, value in fields.items() if name != TRIED_DOMAIN}
    names = tuple(sorted(fields))
    params = []
    for name in names:
        value = fields[name]
        if name == MAILBOX_ID:
            params += [value, value]
        elif name == TRIED_DOMAIN:
            params.append(value)
        else:
            params.append(Pop3Session._meta.get_field(name).get_db_prep_save(value, db))
    params.append(Pop3Session._meta.pk.get_db_prep_value(session_id, db))
    with prepared_cursor() as cursor:
        cursor.execute(_session_update_sql(db.vendor, names), params)


@functools.lru_cache(maxsize=64)
def _session_update_sql(vendor: str, names: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    mailbox, domain = quote(MAILBOX_TABLE), quote(DOMAIN_TABLE)
    assignments = []
    for name in names:
        if name == MAILBOX_ID:
            assignments.append(f"mailbox_id = (SELECT id FROM {mailbox} WHERE id = %s)")
            assignments.append(f"domain_id = (SELECT domain_id FROM {mailbox} WHERE id = %s)")
        elif name == TRIED_DOMAIN:
            assignments.append(f"domain_id = (SELECT id FROM {domain} WHERE name = %s)")
        else:
            assignments.append(f"{quote(Pop3Session._meta.get_field(name).column)} = %s")
    assignments.append(f"updated_at = {_now_sql(vendor)}")
    return f"UPDATE {quote(SESSION_TABLE)} SET {', '.join(assignments)} WHERE id = %s"


def record_last_login(mailbox_id: int, session_id: str, when) -> None:
    """The mailbox's last login: ``when``, and the client address of the session's row (which
    exists by then; an empty address if it does not)."""
    db = connections[DEFAULT_DB_ALIAS]
    params = [
        Mailbox._meta.get_field("last_login_at").get_db_prep_save(when, db),
        Pop3Session._meta.pk.get_db_prep_value(session_id, db),
        mailbox_id,
    ]
    with prepared_cursor() as cursor:
        cursor.execute(_LAST_LOGIN, params)


_LAST_LOGIN = (
    f"UPDATE {MAILBOX_TABLE} SET last_login_at = %s, "
    f"last_login_from = COALESCE((SELECT peer_host FROM {SESSION_TABLE} WHERE id = %s), '') WHERE id = %s"
)


@functools.cache
def _now_sql(vendor: str) -> str:
    """The database's clock as Django writes ``Now()`` (no parameters on either backend)."""
    compiler = Pop3Session.objects.none().query.get_compiler(connection=connection)
    sql, _ = compiler.compile(Now())
    return sql


RELEASE_LEASE = f"DELETE FROM {LEASE_TABLE} WHERE owner = %s"
