"""Behaviour shared by the provisioning commands: argument types, stdin, progress, errors."""

import argparse
import getpass
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from mailadmin.hosting import store
from mailadmin.units import format_size, parse_size

T = TypeVar("T")
# What argparse itself reads as a negative number rather than an option.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
# How argparse begins the error for missing positional arguments.
_REQUIRED = "the following arguments are required"


class TerseParser(CommandParser):
    """A parser whose errors are one line saying what is wrong, and one pointing at ``--help``.

    A value that starts with ``-`` and is no option (``createdomain -bad.test``) is named as
    such, with the way to give it (after ``--``), instead of argparse's "NAME is required".
    """

    given: Sequence[str] = ()

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):
        self.given = list(args or ())
        return super().parse_args(args, namespace)

    def error(self, message: str):
        unknown = next((token for token in self._leading_dash_values() if not self._is_option(token)), None)
        if unknown is not None and message.startswith(_REQUIRED):
            message = (
                f"{unknown!r} is not an option; put values that start with '-' after --, "
                f"as in: {self.prog.strip()} -- {unknown}"
            )
        if not self.called_from_command_line:
            raise CommandError(f"Error: {message}")
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' for usage.\n")

    def _leading_dash_values(self) -> Iterator[str]:
        for token in self.given:
            if token == "--":
                return
            if token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.match(token):
                yield token

    def _is_option(self, token: str) -> bool:
        name = token.split("=", 1)[0]
        options = self._option_string_actions
        # argparse accepts a unique prefix of a long option, and a short option with its value attached.
        return name in options or token[:2] in options or any(option.startswith(name) for option in options)


class OperatorCommand(BaseCommand):
    """A provisioning command: argument errors through :class:`TerseParser`."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # BaseCommand builds a CommandParser itself; TerseParser adds behaviour only, no state to set up.
        parser.__class__ = TerseParser
        return parser


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


def read_password(what: str = "password") -> str:
    """The password (or password hash) from stdin, without its line ending (no echo on a terminal).

    Input of several lines is refused rather than guessed at: which line was meant is unknown.
    """
    if sys.stdin.isatty():
        text = getpass.getpass(f"{what.capitalize()}: ")
    else:
        text = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise CommandError(f"stdin holds more than one line: give the {what} alone, on one line")
    if not text:
        raise CommandError(f"empty {what} on stdin")
    return text


def progress(description: str) -> Callable[[Sequence[T]], Iterable[T]]:
    """Wrap items in a progress bar on stderr, shown only when stderr is a terminal."""

    def wrap(items: Sequence[T]) -> Iterable[T]:
        return tqdm(items, desc=description, unit="row", file=sys.stderr, disable=None)

    return wrap


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn a refusal from the store into a one-line CommandError (exit status 1)."""
    try:
        yield
    except store.StoreError as error:
        raise CommandError(str(error)) from None
