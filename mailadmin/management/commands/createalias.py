"""``createalias SOURCE DEST [DEST ...]``: add an alias."""

from django.core.management.base import CommandParser

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "Create an alias: mail to SOURCE goes to every DEST (mailboxes, aliases or outside addresses)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", metavar="SOURCE", help="The alias's address, local@domain.")
        parser.add_argument("destinations", nargs="+", metavar="DEST", help="Where its mail goes.")

    def handle(self, *args, source: str, destinations: list[str], **options) -> None:
        with store_errors():
            alias = aliases.create_alias(Actor.cli(), source, destinations)
        self.stdout.write(f"created alias {alias.source} -> {', '.join(aliases.destinations_of(alias))}")
