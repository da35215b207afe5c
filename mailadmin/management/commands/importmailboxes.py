"""``importmailboxes FILE.csv``: create many mailboxes in one transaction, all or none."""

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from mailadmin.addresses import domain_of, normalise_address
from mailadmin.hosting import store
from mailadmin.management.commandutils import quota_text
from mailadmin.models import Mailbox
from mailadmin.units import parse_size

HEADER = ["address", "password", "password_hash", "quota"]


class LineError(Exception):
    """A problem with one line of the file; the message does not repeat the line number."""


@dataclass(frozen=True)
class Row:
    line: int
    address: str
    password: str | None
    password_hash: str | None
    quota_bytes: int | None


class Command(BaseCommand):
    help = (
        "Create the mailboxes listed in a CSV file with the header address,password,password_hash,quota: "
        "one of password or password_hash per row (quote hashes that contain commas, like argon2's); "
        "an empty quota takes the domain's default. "
        "Domains must exist. All rows are created in one transaction, or none if any row is wrong."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file",
            metavar="FILE.csv",
            help="UTF-8 CSV; first line exactly address,password,password_hash,quota.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Check every row against the database, then write nothing."
        )

    def handle(self, *args, file: str, dry_run: bool, **options) -> None:
        rows = read_rows(file)
        with transaction.atomic():
            created = [create(row) for row in rows]
            if dry_run:
                transaction.set_rollback(True)
        verb = "would create" if dry_run else "created"
        for mailbox in created:
            self.stdout.write(f"{verb} {mailbox.address} (quota {quota_text(mailbox.quota_bytes)})")
        if dry_run:
            self.stdout.write(f"dry run: {len(created)} mailboxes would be created; nothing was written")
        else:
            self.stdout.write(f"imported {len(created)} mailboxes")


def read_rows(path: str) -> list[Row]:
    """Every row parsed and checked as far as possible without the database (cheap, so first)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return _parse(handle)
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None


def _parse(handle: TextIO) -> list[Row]:
    records = _numbered(handle)
    if next(records, (1, None))[1] != HEADER:
        raise CommandError(f"line 1: the header must be exactly {','.join(HEADER)}")
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    for line, fields in records:
        if not fields:
            continue
        try:
            row = _row(line, fields)
        except (LineError, store.StoreError) as error:
            raise CommandError(f"line {line}: {error}") from None
        if row.address in first_line_of:
            raise CommandError(f"line {line}: {row.address} is already on line {first_line_of[row.address]}")
        first_line_of[row.address] = line
        rows.append(row)
    return rows


def _numbered(handle: TextIO) -> Iterator[tuple[int, list[str]]]:
    """Each record with the line it starts on (a quoted field may span lines)."""
    reader = csv.reader(handle, strict=True)
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as error:
        raise CommandError(f"line {start}: {error}") from None


def _row(line: int, fields: list[str]) -> Row:
    if len(fields) != len(HEADER):
        raise LineError(f"expected {len(HEADER)} fields, found {len(fields)}")
    address, password, password_hash, quota = fields
    try:
        address = normalise_address(address)
    except ValueError as error:
        raise LineError(str(error)) from None
    if bool(password) == bool(password_hash):
        raise LineError("give exactly one of password and password_hash")
    if password_hash:
        store.check_password_hash(password_hash)
    return Row(line, address, password or None, password_hash or None, _quota(quota))


def _quota(text: str) -> int | None:
    if not text.strip():
        return None
    try:
        return parse_size(text)
    except ValueError as error:
        raise LineError(str(error)) from None


def create(row: Row) -> Mailbox:
    try:
        store.get_domain(domain_of(row.address))
        return store.create_mailbox(
            row.address, password=row.password, password_hash=row.password_hash, quota_bytes=row.quota_bytes
        ).mailbox
    except store.StoreError as error:
        raise CommandError(f"line {row.line}: {error}") from None
