"""Byte sizes as operators type them: ``1048576``, ``512K``, ``10M``, ``2G``."""

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """Parse a size in bytes, with an optional binary K/M/G/T suffix; raise ValueError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a number with K, M or G")
    number, unit, _ = match.groups()
    return int(number) * _MULTIPLIERS[unit.upper()]


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
