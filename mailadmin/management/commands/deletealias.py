"""``deletealias SOURCE``: delete an alias (or, given ``@domain``, a catch-all)."""

from django.core.management.base import CommandParser

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "Delete an alias, with its counters; @domain deletes the domain's catch-all."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", metavar="SOURCE", help="The alias's address (or @domain).")

    def handle(self, *args, source: str, **options) -> None:
        with store_errors():
            alias = aliases.get_alias(Actor.cli(), source)
            aliases.delete_alias(Actor.cli(), alias.source)
        self.stdout.write(f"deleted {'catch-all' if alias.is_catch_all else 'alias'} {alias.source}")
