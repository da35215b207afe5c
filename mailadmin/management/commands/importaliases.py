"""``importaliases FILE.csv``: create many aliases in one transaction, all or none."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import aliascsv, aliases
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors


class Command(OperatorCommand):
    help = (
        f"Create the aliases of a CSV file with the header {','.join(aliascsv.HEADER)}, as PostfixAdmin "
        "and Modoboa export them: the destinations in one field, separated by commas or spaces; a source "
        "@domain is a catch-all. All rows are created in one transaction, or none if any row is wrong."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "file", metavar="FILE.csv", help=f"UTF-8 CSV; first line {','.join(aliascsv.HEADER)}."
        )

    def handle(self, *args, file: str, **options) -> None:
        try:
            with open(file, encoding="utf-8-sig", newline="") as handle, store_errors():
                created = aliases.import_aliases(Actor.cli(), handle)
        except OSError as error:
            raise CommandError(f"cannot read {file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"{file} is not UTF-8 text") from None
        self.stdout.write(f"imported {len(created)} alias{'' if len(created) == 1 else 'es'}")
