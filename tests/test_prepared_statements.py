"""The store's hot statements are prepared on PostgreSQL (``fastsql.prepared_cursor``): parsed and
planned once per connection, not at every delivery, login and RETR. The ORM's are not."""

import threading

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import NotSupportedError, close_old_connections, connection

from mailadmin import settings as project_settings
from mailadmin.hosting.store import fastsql
from mailadmin.mailin.delivery import Delivery, DeliveryStatus, Recipient, deliver_group, look_up_recipient
from mailadmin.mailin.messagefile import spool_message
from mailadmin.models import DeliveryFigures, Domain, Mailbox, Message, MessageChunk

pytestmark = pytest.mark.django_db


@pytest.fixture
def postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements are PostgreSQL's (SQLite's driver keeps its own cache)")
    connection.ensure_connection()
    return connection


def prepared(prefix: str) -> list[str]:
    """The statements this connection holds prepared that start with ``prefix``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s", [prefix + "%"])
        return [statement for (statement,) in cursor.fetchall()]


def deliver(address: str, times: int) -> None:
    for n in range(times):
        found = look_up_recipient(address)
        assert isinstance(found, Recipient), found
        with spool_message([b"Subject: %d\r\n\r\nbody\r\n" % n]) as message:
            (results,) = deliver_group([Delivery([found], message, "s@remote.test")])
        assert [result.delivered for result in results] == [True]


def test_a_deliverys_statements_are_prepared_after_a_few_deliveries(postgresql, make_mailbox):
    make_mailbox("a@one.test")
    threshold = postgresql.connection.prepare_threshold
    if threshold is None:
        pytest.skip("DATABASE_PREPARE_THRESHOLD is off here")

    deliver("a@one.test", threshold)
    assert prepared("SELECT m.") == []  # not yet: psycopg prepares a statement on its sixth run

    deliver("a@one.test", 2)
    quoted = connection.ops.quote_name
    assert len(prepared('SELECT m."id"')) == 1  # the RCPT look-up (and a login's)
    assert len(prepared(f"UPDATE {Mailbox._meta.db_table} SET used_bytes")) == 1
    assert len(prepared(f"INSERT INTO {quoted(Message._meta.db_table)}")) == 1
    assert len(prepared(f"INSERT INTO {MessageChunk._meta.db_table}")) == 1
    assert len(prepared("WITH charge (domain_id, add_bytes)")) == 1
    assert len(prepared(f"INSERT INTO {quoted(DeliveryFigures._meta.db_table)}")) == 1
    assert Message.objects.count() == threshold + 2


def test_a_groups_row_locks_are_one_statement_whatever_the_number_of_mailboxes(postgresql, make_mailbox):
    if postgresql.connection.prepare_threshold is None:
        pytest.skip("DATABASE_PREPARE_THRESHOLD is off here")
    addresses = [f"m{n}@one.test" for n in range(4)]
    for address in addresses:
        make_mailbox(address)
    for n in range(12):
        recipients = [look_up_recipient(address) for address in addresses[: 2 + n % 3]]
        with spool_message([b"Subject: %d\r\n\r\nbody\r\n" % n]) as message:
            (results,) = deliver_group([Delivery(recipients, message, "s@remote.test")])
        assert all(result.delivered for result in results)
    assert prepared(f"SELECT id FROM {Mailbox._meta.db_table} WHERE id") == [
        f"SELECT id FROM {Mailbox._meta.db_table} WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE"
    ]


def test_the_orms_statements_are_never_prepared(postgresql, make_mailbox):
    """Django's cursors bind on the client: whatever the threshold, its SQL is never prepared."""
    make_mailbox("a@one.test")
    for _ in range(10):
        assert Mailbox.objects.filter(user__username="a@one.test").count() == 1
    assert prepared("SELECT COUNT(*)") == []


def test_a_threshold_of_off_prepares_nothing(postgresql, make_mailbox, monkeypatch):
    make_mailbox("a@one.test")
    monkeypatch.setattr(postgresql.connection, "prepare_threshold", None)
    deliver("a@one.test", 8)
    assert prepared("UPDATE") == []
    assert prepared("INSERT") == []
    assert prepared("SELECT m.") == []


def test_a_prepared_statement_still_sees_a_changed_quota(postgresql, make_mailbox):
    """A prepared plan keeps no values: the charge's quota check reads the row as it is now."""
    if postgresql.connection.prepare_threshold is None:
        pytest.skip("DATABASE_PREPARE_THRESHOLD is off here")
    mailbox = make_mailbox("a@one.test")
    deliver("a@one.test", 7)
    assert len(prepared(f"UPDATE {Mailbox._meta.db_table} SET used_bytes")) == 1
    Mailbox.objects.filter(pk=mailbox.pk).update(quota_messages=7)

    assert look_up_recipient("a@one.test") == DeliveryStatus.OVER_QUOTA


@pytest.mark.django_db(transaction=True)
def test_a_statement_gone_stale_with_a_migration_fails_once_then_the_connection_is_replaced(
    postgresql, make_mailbox, monkeypatch
):
    """A migration changing the type of a column a prepared statement returns makes PostgreSQL
    refuse the statement. Outside a transaction (a look-up at RCPT or login) it failed at every
    run for as long as the connection lived; now one unit of work fails, as in a transaction."""
    make_mailbox("a@one.test")
    for _ in range(7):
        assert fastsql.find_mailbox("a@one.test") is not None
    assert len(prepared('SELECT m."id"')) == 1
    language = Domain._meta.get_field("language")

    def alter_from_another_connection(length: int) -> None:
        def alter() -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"ALTER TABLE {Domain._meta.db_table} ALTER COLUMN language TYPE varchar({length})"
                    )
            finally:
                connection.close()

        elsewhere = threading.Thread(target=alter)
        elsewhere.start()
        elsewhere.join()

    alter_from_another_connection(language.max_length + 1)
    # Kept between units of work, as the daemons keep theirs (DAEMON_DB_CONN_MAX_AGE)
    monkeypatch.setattr(connection, "close_at", None)
    try:
        with pytest.raises(NotSupportedError, match="cached plan must not change result type"):
            fastsql.find_mailbox("a@one.test")
        close_old_connections()  # what runlmtp, runpop3 and each web request do between units
        assert fastsql.find_mailbox("a@one.test").address == "a@one.test"
        assert fastsql.find_mailbox("a@one.test").address == "a@one.test"
    finally:
        alter_from_another_connection(language.max_length)


@pytest.mark.parametrize(
    ("value", "threshold"), [(None, 5), ("", 5), ("0", 0), ("12", 12), ("off", None), (" OFF ", None)]
)
def test_database_prepare_threshold_is_a_count_or_off(monkeypatch, value, threshold):
    if value is None:
        monkeypatch.delenv("DATABASE_PREPARE_THRESHOLD", raising=False)
    else:
        monkeypatch.setenv("DATABASE_PREPARE_THRESHOLD", value)
    assert project_settings._env_prepare_threshold("DATABASE_PREPARE_THRESHOLD", 5) == threshold


@pytest.mark.parametrize("value", ["-1", "never", "2.5"])
def test_database_prepare_threshold_refuses_anything_else(monkeypatch, value):
    monkeypatch.setenv("DATABASE_PREPARE_THRESHOLD", value)
    with pytest.raises(ImproperlyConfigured, match="DATABASE_PREPARE_THRESHOLD"):
        project_settings._env_prepare_threshold("DATABASE_PREPARE_THRESHOLD", 5)


def test_the_prepared_cursor_is_djangos_own_on_sqlite():
    if connection.vendor != "sqlite":
        pytest.skip("the SQLite side of fastsql.prepared_cursor")
    with fastsql.prepared_cursor() as cursor, connection.cursor() as djangos:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
        assert type(cursor.cursor) is type(djangos.cursor)
