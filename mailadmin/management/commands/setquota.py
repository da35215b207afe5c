"""``setquota ADDRESS SIZE``: change a mailbox's byte quota."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, quota_text, size, store_errors
from mailadmin.units import SIZE_SUFFIXES, format_size


class Command(OperatorCommand):
    help = "Set a mailbox's byte quota."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", metavar="ADDRESS", help="Mailbox address.")
        parser.add_argument(
            "size",
            type=size,
            metavar="SIZE",
            help=f"New quota: bytes or a number with {SIZE_SUFFIXES}; 0 = unlimited.",
        )

    def handle(self, *args, address: str, size: int, **options) -> None:
        with store_errors():
            mailbox = services.update_mailbox(Actor.cli(), address, quota_bytes=size)
        self.stdout.write(f"quota of {mailbox.address} set to {quota_text(mailbox.quota_bytes)}")
        if mailbox.over_quota():
            self.stderr.write(
                f"warning: {mailbox.address} already uses {format_size(mailbox.used_bytes)}, more than its "
                "quota: it receives no mail until its usage is below the quota"
            )
