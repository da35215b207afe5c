"""Byte sizes as operators type them: ``1048576``, ``512K``, ``10M``, ``2G``, ``1T``.

The one parser of sizes for every door (commands, admin forms, the import file), so a size that
works in one works in all, and the one rule for showing usage as a percentage.
"""

import re

from django.db.models import BigIntegerField, Expression, ExpressionWrapper, F
from django.db.models.expressions import Combinable
from django.db.models.functions import NullIf
from django.utils.translation import gettext

_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# Binary multiples; "5M", "5MB" and "5MiB" all mean 5 MiB.
_SIZE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])I?)?B?\s*$", re.IGNORECASE)
SIZE_SUFFIXES = "K, M, G or T"


def parse_size(text: str) -> int:
    """Parse a size in bytes, with an optional binary K/M/G/T suffix; raise ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(
            gettext("invalid size %(text)r: use a number of bytes or a number with %(suffixes)s")
            % {"text": text, "suffixes": SIZE_SUFFIXES}
        )
    number, unit = match.groups()
    return int(number) * _MULTIPLIERS[(unit or "").upper()]


def format_size(size_bytes: int) -> str:
    """Human-readable binary size: ``512 B``, ``1.5 KiB``, ``10.0 MiB``."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    value, units = size_bytes / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.1f} {units[0]}"


def compact_size(size_bytes: int) -> str:
    """The size as an operator would type it, in the largest unit that divides it exactly: ``500M``."""
    for unit in ("T", "G", "M", "K"):
        multiplier = _MULTIPLIERS[unit]
        if size_bytes and size_bytes % multiplier == 0:
            return f"{size_bytes // multiplier}{unit}"
    return str(size_bytes)


def usage_percent(used_bytes: int, quota_bytes: int) -> int | None:
    """Whole percent of the quota in use, rounded down so that 100 means full; None when unlimited."""
    if not quota_bytes:
        return None
    return 100 * used_bytes // quota_bytes


class SqlInteger(Expression):
    """An integer written into the SQL itself, not passed as a parameter.

    An index on an expression serves a query only when the query's expression is the same SQL:
    a literal ``100`` in the index and a bound parameter in the query are not.
    """

    output_field = BigIntegerField()

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = int(value)

    def as_sql(self, compiler, connection) -> tuple[str, list]:
        return str(self.value), []


def usage_percent_sql(used: str, quota: str) -> Combinable:
    """``usage_percent`` in SQL, for sorting and filtering in the database: NULL when unlimited.

    Both operands are non-negative integers, so integer division rounds down on SQLite and
    PostgreSQL alike; NULLIF makes an unlimited quota (0) give NULL instead of dividing by zero.
    """
    percent = F(used) * SqlInteger(100) / NullIf(F(quota), SqlInteger(0))
    return ExpressionWrapper(percent, output_field=BigIntegerField())
