"""``createadmin USERNAME --domain NAME ... --password-stdin``: a domain administrator."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, read_password, store_errors


class Command(OperatorCommand):
    help = (
        "Create a domain administrator (a staff login scoped to the domains named), or give an existing "
        "one exactly these domains and a new password."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", metavar="USERNAME", help="The administrator's login name.")
        parser.add_argument(
            "--domain",
            action="append",
            required=True,
            metavar="NAME",
            dest="domains",
            help="A domain they administer; repeat for several.",
        )
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the password from stdin, alone on one line (required).",
        )

    def handle(self, *args, username: str, domains: list[str], password_stdin: bool, **options) -> None:
        if not password_stdin:
            raise CommandError(
                "pass --password-stdin and give the password on stdin "
                "(a password on the command line would show in ps and shell history)"
            )
        with store_errors():
            administrator = services.save_domain_administrator(
                Actor.cli(), username, domains, read_password()
            )
        verb = "created" if administrator.created else "updated"
        self.stdout.write(
            f"{verb} administrator {administrator.username} of {', '.join(administrator.domain_names)}"
        )
