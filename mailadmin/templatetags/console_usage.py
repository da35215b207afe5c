"""Filters for showing usage on the console's pages."""

from django import template

from mailadmin.units import format_size

register = template.Library()


@register.filter
def size(size_bytes: int) -> str:
    """``1.5 MiB``: ``units.format_size``, the admin's way of showing a size."""
    return format_size(size_bytes)


@register.filter
def at_most(value: int, ceiling: int) -> int:
    """A mailbox over its lowered quota is over 100 %; its bar stops full."""
    return min(value, ceiling)
