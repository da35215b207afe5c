"""The mailbox import file: ``address,password,password_hash,quota``, checked line by line.

Everything that can be checked without the database is checked here, before anything is
written; each refusal names the line it is on (a quoted field may span lines: the record's
first line), and carries it as ``error.row``. The same rows also come as a JSON list of
objects (``address``, ``password``, ``password_hash``, ``quota_bytes``), numbered from 1.
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
RECORD_FIELDS = frozenset({"address", "password", "password_hash", "quota_bytes"})
LINE, ROW = "line", "row"


@dataclass(frozen=True)
class Row:
    line: int
    address: str
    password: str | None
    password_hash: str | None
    quota_bytes: int | None  # None: the domain's default
    quota_messages: int = 0
    place: str = "line"  # what ``line`` counts: LINE of a file, or ROW of a JSON list

    def refusal(self, error: Exception) -> store.StoreError:
        """``error`` as a refusal naming this row (see ``refusal_at``)."""
        return refusal_at(self.place, self.line, error)


def refusal_at(place: str, number: int, error: Exception | str) -> store.StoreError:
    """A refusal whose message starts with ``"line 3: "`` (or ``"row 3: "``) and that carries
    ``row`` and ``field``."""
    kind = type(error) if isinstance(error, store.StoreError) else store.InvalidInput
    if place == LINE:
        message = store.on_line(number, error)
    else:
        message = gettext("row %(row)d: %(error)s") % {"row": number, "error": error}
    refusal = kind(message, field=getattr(error, "field", None))
    refusal.row = number
    return refusal


def from_records(records: object) -> list[Row]:
    """The rows of a JSON list of objects, or ``store.InvalidInput`` naming the first wrong one."""
    if not isinstance(records, list):
        raise store.InvalidInput(gettext("expected a list of mailboxes"))
    rows: list[Row] = []
    first_row_of: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        try:
            row = _record_row(number, record)
        except (ValueError, store.StoreError) as error:
            raise refusal_at(ROW, number, error) from None
        if row.address in first_row_of:
            repeated = gettext("%(address)s is already in row %(first)d") % {
                "address": row.address,
                "first": first_row_of[row.address],
            }
            raise refusal_at(ROW, number, repeated)
        first_row_of[row.address] = number
        rows.append(row)
    return rows


def _record_row(number: int, record: object) -> Row:
    if not isinstance(record, dict):
        raise ValueError(gettext("expected an object with an address and a password or password_hash"))
    unknown = sorted(set(record) - RECORD_FIELDS)
    if unknown:
        raise ValueError(gettext("unknown fields: %(fields)s") % {"fields": ", ".join(unknown)})
    texts = [record.get(name) or "" for name in ("address", "password", "password_hash")]
    if not all(isinstance(text, str) for text in texts):
        raise ValueError(gettext("address, password and password_hash must be strings"))
    quota = record.get("quota_bytes")
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
        raise store.InvalidInput(
            gettext("quota_bytes must be a whole number, 0 or more"), field="quota_bytes"
        )
    row = _row(number, [*texts, ""])
    return Row(number, row.address, row.password, row.password_hash, quota, place=ROW)


def parse(handle: TextIO) -> list[Row]:
    """Every row of the file, or ``store.InvalidInput`` naming the first wrong line."""
    records = numbered_records(handle)
    if next(records, (1, None))[1] != HEADER:
        header = gettext("the header must be exactly %(header)s") % {"header": ",".join(HEADER)}
        raise refusal_at(LINE, 1, header)
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    for line, fields in records:
        if not fields:
            continue
        try:
            row = _row(line, fields)
        except (ValueError, store.StoreError) as error:
            raise refusal_at(LINE, line, error) from None
        require_first_mention(row, first_line_of)
        rows.append(row)
    return rows


def require_first_mention(row: Row, first_line_of: dict[str, int]) -> None:
    """Refuse a second row of one address, naming both lines; note the first in ``first_line_of``."""
    if row.address in first_line_of:
        repeated = gettext("%(address)s is already on line %(first)d") % {
            "address": row.address,
            "first": first_line_of[row.address],
        }
        raise refusal_at(LINE, row.line, repeated)
    first_line_of[row.address] = row.line


def numbered_records(handle: TextIO) -> Iterator[tuple[int, list[str]]]:
    """The CSV records of ``handle`` with the line each starts on; a malformed one names its line."""
    reader = csv.reader(handle, strict=True)
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as error:
        raise refusal_at(LINE, start, error) from None


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
        try:
            password_hash = store.storable_password_hash(password_hash)
        except store.StoreError as error:
            error.field = error.field or "password_hash"
            raise
    return Row(line, address, password or None, password_hash or None, _quota(quota))


def _quota(text: str) -> int | None:
    return parse_size(text) if text.strip() else None
