"""``setpassword ADDRESS --password-stdin``: replace a mailbox's password."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, read_password, store_errors


class Command(OperatorCommand):
    help = "Set a mailbox's password, read from stdin."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", metavar="ADDRESS", help="Mailbox address.")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the new password from stdin, alone on one line (required).",
        )

    def handle(self, *args, address: str, password_stdin: bool, **options) -> None:
        if not password_stdin:
            raise CommandError(
                "pass --password-stdin and give the password on stdin "
                "(a password on the command line would show in ps and shell history)"
            )
        with store_errors():
            mailbox = services.set_password(Actor.cli(), address, read_password())
        self.stdout.write(f"password changed for {mailbox.address}")
