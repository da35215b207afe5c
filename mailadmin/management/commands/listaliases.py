"""``listaliases``: aliases and catch-alls with their destinations and recent traffic."""

from django.core.management.base import CommandParser

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = (
        "List aliases and catch-alls (@domain) with their destinations and the messages each received "
        f"in the last {aliases.RECENT_DAYS} days."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--domain", metavar="NAME", help="Only list aliases of this domain.")

    def handle(self, *args, domain: str | None, **options) -> None:
        with store_errors():
            found = aliases.list_aliases(Actor.cli(), domain)
        header = ("source", "active", f"{aliases.RECENT_DAYS}d", "destinations")
        rows = [header] + [
            (
                alias.source,
                "yes" if alias.active else "no",
                str(alias.received_recently),
                ", ".join(aliases.destinations_of(alias)),
            )
            for alias in found
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(3)]
        for source, active, received, destinations in rows:
            cells = [
                source.ljust(widths[0]),
                active.ljust(widths[1]),
                received.rjust(widths[2]),
                destinations,
            ]
            self.stdout.write("  ".join(cells).rstrip())
        self.stdout.write(f"{len(found)} alias{'' if len(found) == 1 else 'es'}")
