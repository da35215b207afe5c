"""``prunehistory [--days N]``: delete old ended POP3 sessions and failed logins."""

from django.conf import settings
from django.core.management.base import CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, count


class Command(OperatorCommand):
    help = (
        "Delete ended POP3 sessions and failed logins older than N days (default MAILADMIN_HISTORY_DAYS). "
        "Open sessions are kept; safe to run while the servers run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=count, metavar="N", help="Keep this many days of history.")

    def handle(self, *args, days: int | None, **options) -> None:
        if days is None:
            days = settings.MAILADMIN_HISTORY_DAYS
        pruned = services.prune_history(Actor.cli(), days)
        self.stdout.write(
            f"removed {_counted(pruned.sessions, 'ended session')} and "
            f"{_counted(pruned.failures, 'failed login')} older than {_counted(days, 'day')}"
        )


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' if number != 1 else ''}"
