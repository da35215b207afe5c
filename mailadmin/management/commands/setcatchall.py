"""``setcatchall DOMAIN DEST [DEST ...] | --off``: a domain's catch-all."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = (
        "Send the mail for a domain's addresses that are neither mailbox nor alias to every DEST, "
        "replacing any catch-all it had; --off removes it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("domain", metavar="DOMAIN")
        parser.add_argument("destinations", nargs="*", metavar="DEST", help="Where the mail goes.")
        parser.add_argument("--off", action="store_true", help="Remove the domain's catch-all.")

    def handle(self, *args, domain: str, destinations: list[str], off: bool, **options) -> None:
        if off == bool(destinations):
            raise CommandError("give either destinations or --off, not both or neither", returncode=2)
        with store_errors():
            alias = aliases.set_catch_all(Actor.cli(), domain, None if off else destinations)
        if alias is None:
            self.stdout.write(f"catch-all of {domain}: off")
        else:
            self.stdout.write(f"catch-all {alias.source} -> {', '.join(aliases.destinations_of(alias))}")
