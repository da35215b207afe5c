"""The mailbox import file: ``address,password,password_hash,quota``, checked line by line.

Everything that can be checked without the database is checked here, before anything is
written; each refusal names the line it is on (a quoted field may span lines: the record's
first line).
"""

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from django.utils.translation import gettext

from mailadmin.addresses import normalise_address
from mailadmin.hosting import store
from mailadmin.units import parse_size

HEADER = ["address", "password", "password_hash", "quota"]


@dataclass(frozen=True)
class Row:
    line: int
    address: str
    password: str | None
    password_hash: str | None
    quota_bytes: int | None  # None: the domain's default
    quota_messages: int = 0


def parse(handle: TextIO) -> list[Row]:
    """Every row of the file, or ``store.InvalidInput`` naming the first wrong line."""
    records = _numbered(handle)
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
        except (ValueError, store.StoreError) as error:
            raise store.InvalidInput(store.on_line(line, error)) from None
        require_first_mention(row, first_line_of)
        rows.append(row)
    return rows


def require_first_mention(row: Row, first_line_of: dict[str, int]) -> None:
    """Refuse a second row of one address, naming both lines; note the first in ``first_line_of``."""
    if row.address in first_line_of:
        first = first_line_of[row.address]
        raise store.InvalidInput(
            gettext("line %(line)d: %(address)s is already on line %(first)d")
            % {"line": row.line, "address": row.address, "first": first}
        )
    first_line_of[row.address] = row.line


def _numbered(handle: TextIO) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(handle, strict=True)
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as error:
        raise store.InvalidInput(store.on_line(start, error)) from None


def _row(line: int, fields: list[str]) -> Row:
    if len(fields) != len(HEADER):
        raise ValueError(
            gettext("expected %(expected)d fields, found %(found)d")
            % {"expected": len(HEADER), "found": len(fields)}
        )
    address, password, password_hash, quota = fields
    address = normalise_address(address)
    if bool(password) == bool(password_hash):
        raise ValueError(gettext("give exactly one of password and password_hash"))
    if password_hash:
        password_hash = store.storable_password_hash(password_hash)
    return Row(line, address, password or None, password_hash or None, _quota(quota))


def _quota(text: str) -> int | None:
    return parse_size(text) if text.strip() else None
