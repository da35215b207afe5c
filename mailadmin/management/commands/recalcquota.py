"""``recalcquota [ADDRESS]``: recount usage counters from the stored messages."""

from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "Recount mailbox and domain usage from the stored messages, correct any drift and report it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "address", nargs="?", metavar="ADDRESS", help="Only this mailbox (and its domain); default: all."
        )

    def handle(self, *args, address: str | None, **options) -> None:
        with store_errors():
            drifts = services.recalculate_quota(Actor.cli(), address)
        for drift in drifts:
            recorded = f"recorded {drift.recorded}, actual {drift.actual}"
            self.stdout.write(f"{drift.subject} {drift.counter}: {recorded} (corrected)")
        if not drifts:
            self.stdout.write("no drift")
