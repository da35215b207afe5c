"""``createaliasdomain ALIAS TARGET``: another name for a hosted domain."""

from django.core.management.base import CommandParser

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = "Make ALIAS another name of the hosted domain TARGET: mail to user@ALIAS goes to user@TARGET."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("alias", metavar="ALIAS", help="The alias domain's name (not a domain here).")
        parser.add_argument("target", metavar="TARGET", help="A domain hosted here.")

    def handle(self, *args, alias: str, target: str, **options) -> None:
        with store_errors():
            alias_domain = aliases.create_alias_domain(Actor.cli(), alias, target)
        self.stdout.write(f"created alias domain {alias_domain.name} -> {alias_domain.target.name}")
