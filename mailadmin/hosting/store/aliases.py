"""The alias tables as delivery reads them, the rules that keep addresses and domain names
unique, and the counters of what each alias received.

Expansion asks first whether an address is a mailbox (``fastsql.find_recipient``, one cached
query) and reads the alias tables only when it is not, so a plain mailbox costs what it did.
"""

import functools
from datetime import date, timedelta

from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from django.utils.translation import gettext

from mailadmin.hosting.expansion import AliasEntry, catch_all_source
from mailadmin.hosting.store.errors import AlreadyExists
from mailadmin.hosting.store.fastsql import find_mailbox, find_recipient
from mailadmin.models import Alias, AliasDailyCount, AliasDestination, AliasDomain, Domain


class StoreDirectory:
    """The tables as :func:`mailadmin.hosting.expansion.expand` reads them.

    With ``size_bytes``, a mailbox is ``(mailbox, fits)`` as :func:`find_recipient` gives it (for
    delivery); without, the mailbox alone. ``proposed`` stands for one alias's destinations as
    they would be saved, for the loop check before saving.
    """

    def __init__(self, size_bytes: int | None = None, proposed: AliasEntry | None = None) -> None:
        self.size_bytes = size_bytes
        self.proposed = proposed

    def mailbox(self, address: str) -> object | None:
        if self.size_bytes is None:
            return find_mailbox(address)
        return find_recipient(address, self.size_bytes)

    def aliases(self, address: str) -> tuple[AliasEntry | None, AliasEntry | None]:
        catch_all = catch_all_source(address.rpartition("@")[2])
        found = active_aliases(address, catch_all)
        if self.proposed is not None and self.proposed.source in (address, catch_all):
            found[self.proposed.source] = self.proposed
        return found.get(address), found.get(catch_all)

    def alias_domain_target(self, domain: str) -> str | None:
        return AliasDomain.objects.filter(name=domain).values_list("target__name", flat=True).first()

    def is_hosted(self, domain: str) -> bool:
        return Domain.objects.filter(name=domain).exists() or AliasDomain.objects.filter(name=domain).exists()


def active_aliases(*sources: str) -> dict[str, AliasEntry]:
    """The active aliases (of active domains) among ``sources``, with their destinations: one query."""
    rows = (
        AliasDestination.objects.filter(
            alias__source__in=sources, alias__active=True, alias__domain__active=True
        )
        .order_by("alias_id", "id")
        .values_list("alias_id", "alias__source", "address")
    )
    destinations: dict[tuple[int, str], list[str]] = {}
    for alias_id, source, address in rows:
        destinations.setdefault((alias_id, source), []).append(address)
    return {
        source: AliasEntry(alias_id, source, tuple(found))
        for (alias_id, source), found in destinations.items()
    }


def require_address_free(address: str) -> None:
    """One rule for both directions: an address is a mailbox or an alias, never both."""
    if find_mailbox(address) is not None:
        raise AlreadyExists(
            gettext("%(address)s is a mailbox; an alias cannot have its address") % {"address": address}
        )
    if Alias.objects.filter(source=address).exists():
        raise AlreadyExists(
            gettext("%(address)s is an alias; delete it first to use its address") % {"address": address}
        )


def require_new_mailbox_address(address: str) -> None:
    """What a new mailbox's address needs: no login has it (so no mailbox either) and no alias,
    asked in one statement. The refusals are ``create_mailbox``'s and ``require_address_free``'s."""
    with connection.cursor() as cursor:
        cursor.execute(_address_use_sql(connection.vendor), {"address": address})
        login_exists, alias_exists = cursor.fetchone()
    if login_exists:
        raise AlreadyExists(gettext("mailbox %(address)s already exists") % {"address": address})
    if alias_exists:
        raise AlreadyExists(
            gettext("%(address)s is an alias; delete it first to use its address") % {"address": address}
        )


@functools.cache
def _address_use_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    user = get_user_model()._meta
    username = quote(user.get_field("username").column)
    source = quote(Alias._meta.get_field("source").column)
    return (
        f"SELECT EXISTS (SELECT 1 FROM {quote(user.db_table)} WHERE {username} = %(address)s), "
        f"EXISTS (SELECT 1 FROM {quote(Alias._meta.db_table)} WHERE {source} = %(address)s)"
    )


def require_domain_name_free(name: str) -> None:
    """A name is a domain or an alias domain, never both: checked for a new alias domain."""
    if Domain.objects.filter(name=name).exists():
        raise AlreadyExists(gettext("%(name)s is a domain already") % {"name": name})
    require_not_alias_domain(name)


def require_not_alias_domain(name: str) -> None:
    """The same rule, for a new domain (whose own name is unique in its table already)."""
    if AliasDomain.objects.filter(name=name).exists():
        raise AlreadyExists(gettext("%(name)s is an alias domain already") % {"name": name})


# Days of counts kept per alias: what the admin shows ("received in the last 30 days").
RECENT_DAYS = 30
_COUNT_TABLE = AliasDailyCount._meta.db_table
# From the alias row itself, so an alias deleted since the RCPT is not counted (its count row
# would break the foreign key at commit, failing the whole group).
COUNT_DELIVERY = (
    f"INSERT INTO {_COUNT_TABLE} (alias_id, day, messages) "
    f"SELECT id, %s, 1 FROM {Alias._meta.db_table} WHERE id = %s "
    f"ON CONFLICT (alias_id, day) DO UPDATE SET messages = {_COUNT_TABLE}.messages + 1 "
    "RETURNING messages"
)
FORGET_OLD_COUNTS = f"DELETE FROM {_COUNT_TABLE} WHERE alias_id = %s AND day < %s"


def count_alias_delivery(alias_ids: list[int]) -> None:
    """Count one message received by each alias, on today's (UTC) row: an upsert each, in id
    order (as every writer of a group takes its rows, so groups never deadlock).

    Called in the delivery's own transaction, so the count commits (or rolls back) with the
    copies it counts. SQLite 3.35+ and PostgreSQL both know ``ON CONFLICT ... DO UPDATE ...
    RETURNING``. The day's first message also deletes the alias's rows that fell out of the
    last RECENT_DAYS days, so the table never holds more than that per alias, without a job.
    """
    today = timezone.now().date()
    with connection.cursor() as cursor:
        for alias_id in alias_ids:
            cursor.execute(COUNT_DELIVERY, [today, alias_id])
            row = cursor.fetchone()
            if row is not None and row[0] == 1:
                cursor.execute(FORGET_OLD_COUNTS, [alias_id, first_recent_day()])


def first_recent_day() -> date:
    """The oldest day whose count is among the last RECENT_DAYS days (today included)."""
    return timezone.now().date() - timedelta(days=RECENT_DAYS - 1)
