"""Argument types and helpers shared by the provisioning commands."""

import argparse
import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.management.base import CommandError

from mailadmin.hosting import store
from mailadmin.units import format_size, parse_size


def size(text: str) -> int:
    """argparse type: a byte size such as ``1048576``, ``512K`` or ``10M``."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: use a whole number, 0 or more")
    return int(text)


def quota_text(quota_bytes: int) -> str:
    return format_size(quota_bytes) if quota_bytes else "unlimited"


def read_password() -> str:
    """One password from stdin: the first line without its line ending (no echo on a terminal)."""
    if sys.stdin.isatty():
        line = getpass.getpass("Password: ")
    else:
        line = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not line:
        raise CommandError("empty password on stdin")
    return line


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn a refusal from the store into a one-line CommandError (exit status 1)."""
    try:
        yield
    except store.StoreError as error:
        raise CommandError(str(error)) from None
