"""``exportaliases (--postfix FILE | --sql-view)``: the aliases for Postfix's virtual_alias_maps."""

import os
import tempfile
from pathlib import Path

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import postfixmap
from mailadmin.management.commandutils import OperatorCommand


class Command(OperatorCommand):
    help = (
        "Write the alias table Postfix's virtual_alias_maps reads: a file for postmap (--postfix FILE, "
        f"e.g. with SQLite), or the SQL creating the view {postfixmap.VIEW_NAME} for a pgsql: table "
        "(--sql-view, for PostgreSQL)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--postfix", metavar="FILE", help="Write 'source destinations' lines, for postmap.")
        what.add_argument(
            "--sql-view", action="store_true", help="Print CREATE OR REPLACE VIEW for PostgreSQL."
        )

    def handle(self, *args, postfix: str | None, sql_view: bool, **options) -> None:
        if sql_view:
            self.stdout.write(postfixmap.view_sql(), ending="")
            return
        count = _write_atomically(Path(postfix), postfixmap.map_lines())
        self.stdout.write(f"wrote {count} entries to {postfix}; now run: postmap {postfix}")


def _write_atomically(path: Path, lines) -> int:
    """Write beside the file, then rename over it: Postfix's postmap never reads half a file."""
    count = 0
    try:
        handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False)
    except OSError as error:
        raise CommandError(f"cannot write {path}: {error.strerror}") from None
    try:
        with handle:
            for line in lines:
                handle.write(line + "\n")
                count += 1
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
    return count
