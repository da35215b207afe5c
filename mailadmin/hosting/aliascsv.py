"""The alias import file: ``source,destinations``, as PostfixAdmin and Modoboa export aliases.

The destinations of a row are one field, separated by commas or white space (PostfixAdmin's
``goto`` column holds ``a@x.test,b@x.test``; other exports use spaces). A source ``@domain`` is
the domain's catch-all. Everything that can be checked without the database is checked here;
each refusal names the line (a quoted field may span lines: the record's first line).
"""

import re
from dataclasses import dataclass
from typing import TextIO

from django.utils.translation import gettext

from mailadmin.addresses import normalise_address, normalise_domain
from mailadmin.hosting import store
from mailadmin.hosting.mailboxcsv import numbered_records
from mailadmin.models import CATCH_ALL_PREFIX

HEADER = ["source", "destinations"]
_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class Row:
    line: int
    source: str  # normalised; "@domain" for a catch-all
    destinations: tuple[str, ...]  # normalised, without repeats, in the order given

    @property
    def is_catch_all(self) -> bool:
        return self.source.startswith(CATCH_ALL_PREFIX)


def parse(handle: TextIO) -> list[Row]:
    """Every row of the file, or ``store.InvalidInput`` naming the first wrong line."""
    records = numbered_records(handle)
    if next(records, (1, None))[1] != HEADER:
        raise store.InvalidInput(
            gettext("line 1: the header must be exactly %(header)s") % {"header": ",".join(HEADER)}
        )
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    for line, fields in records:
        if not fields:
            continue
        try:
            row = _row(line, fields)
        except ValueError as error:
            raise store.InvalidInput(
                gettext("line %(line)d: %(error)s") % {"line": line, "error": error}
            ) from None
        if row.source in first_line_of:
            raise store.InvalidInput(
                gettext("line %(line)d: %(address)s is already on line %(first)d")
                % {"line": line, "address": row.source, "first": first_line_of[row.source]}
            )
        first_line_of[row.source] = line
        rows.append(row)
    return rows


def _row(line: int, fields: list[str]) -> Row:
    if len(fields) != len(HEADER):
        raise ValueError(
            gettext("expected %(expected)d fields, found %(found)d")
            % {"expected": len(HEADER), "found": len(fields)}
        )
    source, destinations = fields
    return Row(line, normalise_source(source), normalise_destinations(_SEPARATORS.split(destinations)))


def normalise_source(source: str) -> str:
    """``local@domain``, or ``@domain`` for a catch-all, normalised; ValueError if neither."""
    text = source.strip()
    if text.startswith(CATCH_ALL_PREFIX):
        return CATCH_ALL_PREFIX + normalise_domain(text[len(CATCH_ALL_PREFIX) :])
    return normalise_address(text)


def normalise_destinations(destinations: list[str]) -> tuple[str, ...]:
    """Each destination normalised, without repeats, in the order given; ValueError if none."""
    normalised = [normalise_address(destination) for destination in destinations if destination.strip()]
    if not normalised:
        raise ValueError(gettext("an alias needs at least one destination"))
    return tuple(dict.fromkeys(normalised))
