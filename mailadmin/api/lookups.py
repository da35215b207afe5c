"""The token look-ups every request makes, as SQL built once.

The equivalent queryset (``ApiToken.objects.filter(prefix=...).first()``) spends most of a
Bearer check's CPU compiling its SQL each time; here the SQL is built once per database
vendor and the row turned into an ``ApiToken`` the way a queryset loads it (``from_db``).
"""

import functools
from dataclasses import dataclass

from django.db import DEFAULT_DB_ALIAS, connections

from mailadmin.api.models import ApiToken
from mailadmin.hosting.store.fastsql import (
    ConvertedColumn,
    converted_columns,
    fetch_converted_row,
    prepared_cursor,
)


@dataclass(frozen=True)
class _Lookup:
    sql: str
    names: list[str]  # the fields' attnames, in column order
    converted: list[ConvertedColumn]  # the columns whose values this backend converts


def find_token(prefix: str) -> ApiToken | None:
    db = connections[DEFAULT_DB_ALIAS]
    lookup = _token_lookup(db.vendor)
    values = fetch_converted_row(lookup.sql, [prefix], lookup.converted)
    if values is None:
        return None
    return ApiToken.from_db(db.alias, lookup.names, values)


def token_domain_ids(token: ApiToken) -> list[int]:
    """The ids of the domains a token is confined to (none for a token of every domain)."""
    if token.all_domains:
        return []
    with prepared_cursor() as cursor:
        cursor.execute(_domains_sql(connections[DEFAULT_DB_ALIAS].vendor), [token.pk])
        return [domain_id for (domain_id,) in cursor.fetchall()]


@functools.cache
def _domains_sql(vendor: str) -> str:
    quote = connections[DEFAULT_DB_ALIAS].ops.quote_name
    through = ApiToken.domains.through._meta
    domain, token = through.get_field("domain").column, through.get_field("apitoken").column
    return f"SELECT {quote(domain)} FROM {quote(through.db_table)} WHERE {quote(token)} = %s"


@functools.cache
def _token_lookup(vendor: str) -> _Lookup:
    db = connections[DEFAULT_DB_ALIAS]
    fields = ApiToken._meta.concrete_fields
    columns = [field.get_col(ApiToken._meta.db_table) for field in fields]
    quote = db.ops.quote_name
    selected = ", ".join(quote(field.column) for field in fields)
    return _Lookup(
        sql=f"SELECT {selected} FROM {quote(ApiToken._meta.db_table)} WHERE {quote('prefix')} = %s",
        names=[field.attname for field in fields],
        converted=converted_columns(columns),
    )
