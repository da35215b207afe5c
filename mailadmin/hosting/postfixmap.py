"""The aliases as Postfix's ``virtual_alias_maps`` reads them: one SELECT, for a view or a file.

Postfix expands aliases before it delivers, so outside destinations are forwarded by Postfix
and only mailbox addresses reach runlmtp. The table it needs (virtual(5)) has a row per
``source -> destination``:

* every mailbox to itself, so that a domain's catch-all never takes a mailbox's mail (Postfix
  looks the full address up before ``@domain``, and an address mapped to itself stops there);
* every destination of every active alias and catch-all (``@domain``) of an active domain;
* for each alias domain, every address of its target under the alias domain's name, to that
  address (``user@alias -> user@target``; a catch-all gives ``@alias -> @target``, which Postfix
  reads as "the same user in the target"), so Postfix accepts exactly the addresses we have.

This is the expansion rule of :mod:`mailadmin.hosting.expansion` as a table. The SELECT runs
unchanged on SQLite and PostgreSQL: PostgreSQL serves it as a view (``exportaliases
--sql-view``) to Postfix's ``pgsql:`` table, SQLite through a file ``postmap`` turns into a
hash table (``exportaliases --postfix FILE``).
"""

from collections.abc import Iterator
from itertools import groupby

from django.contrib.auth import get_user_model
from django.db import connection

from mailadmin.models import Alias, AliasDestination, AliasDomain, Domain, Mailbox

VIEW_NAME = "postfix_virtual_aliases"


def select_sql() -> str:
    """``SELECT source, destination`` of every row Postfix's virtual alias table needs."""
    mailbox, user, domain = Mailbox._meta.db_table, get_user_model()._meta.db_table, Domain._meta.db_table
    alias, destination = Alias._meta.db_table, AliasDestination._meta.db_table
    alias_domain = AliasDomain._meta.db_table
    mailbox_addresses = (
        f"SELECT u.username AS source, m.domain_id AS domain_id "
        f"FROM {mailbox} m JOIN {user} u ON u.id = m.user_id"
    )
    active_aliases = (
        f"SELECT a.source AS source, a.domain_id AS domain_id FROM {alias} a "
        f"JOIN {domain} d ON d.id = a.domain_id WHERE a.active AND d.active"
    )
    return (
        f"SELECT source, source AS destination FROM ({mailbox_addresses}) mailboxes\n"
        f"UNION ALL\n"
        f"SELECT a.source, t.address FROM {alias} a JOIN {domain} d ON d.id = a.domain_id "
        f"JOIN {destination} t ON t.alias_id = a.id WHERE a.active AND d.active\n"
        f"UNION ALL\n"
        f"SELECT substr(v.source, 1, length(v.source) - length(d.name)) || ad.name, v.source\n"
        f"FROM ({mailbox_addresses} UNION ALL {active_aliases}) v\n"
        f"JOIN {domain} d ON d.id = v.domain_id JOIN {alias_domain} ad ON ad.target_id = d.id"
    )


def view_sql() -> str:
    return f"CREATE OR REPLACE VIEW {VIEW_NAME} AS\n{select_sql()};\n"


def map_lines() -> Iterator[str]:
    """``source destination,destination`` lines, sorted by source: a ``postmap`` source file."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT source, destination FROM ({select_sql()}) x ORDER BY source, destination")
        rows = cursor.fetchall()
    for source, group in groupby(rows, key=lambda row: row[0]):
        yield f"{source} {','.join(destination for _, destination in group)}"
