"""``listmailboxes``: a table of mailboxes with their usage."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, quota_text, store_errors
from mailadmin.models import Mailbox
from mailadmin.units import format_size, usage_percent

HEADER = ("address", "active", "messages", "used", "quota", "percent")
# Text columns read best left-aligned, numbers right-aligned.
LEFT_ALIGNED = {"address", "active"}


class Command(OperatorCommand):
    help = "List mailboxes with their message count, usage and quota."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--domain", metavar="NAME", help="Only list mailboxes of this domain.")

    def handle(self, *args, domain: str | None, **options) -> None:
        with store_errors():
            mailboxes = services.list_mailboxes(Actor.cli(), domain)
            legacy = services.count_legacy_hashes(Actor.cli(), domain)
        rows = [HEADER, *(_row(mailbox) for mailbox in mailboxes)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
        for row in rows:
            cells = [_align(name, cell, width) for name, cell, width in zip(HEADER, row, widths, strict=True)]
            self.stdout.write("  ".join(cells).rstrip())
        self.stdout.write(f"{len(mailboxes)} mailbox{'' if len(mailboxes) == 1 else 'es'}")
        if legacy:
            self.stdout.write(
                f"{legacy} of them still {'has' if legacy == 1 else 'have'} a legacy password hash "
                "(imported; replaced by argon2 at the next login)"
            )


def _row(mailbox: Mailbox) -> tuple[str, ...]:
    percent = usage_percent(mailbox.used_bytes, mailbox.quota_bytes)
    return (
        mailbox.address,
        "yes" if mailbox.active else "no",
        str(mailbox.used_messages),
        format_size(mailbox.used_bytes),
        quota_text(mailbox.quota_bytes),
        "-" if percent is None else f"{percent}%",
    )


def _align(column: str, cell: str, width: int) -> str:
    return cell.ljust(width) if column in LEFT_ALIGNED else cell.rjust(width)
