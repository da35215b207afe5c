"""``setpassword ADDRESS (--password-stdin | --hash)``: replace a mailbox's password."""

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, read_password, store_errors


class Command(OperatorCommand):
    help = "Set a mailbox's password, or a password hash made elsewhere, read from stdin."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", metavar="ADDRESS", help="Mailbox address.")
        given = parser.add_mutually_exclusive_group()
        given.add_argument(
            "--password-stdin",
            action="store_true",
            help="Read the new password from stdin, alone on one line.",
        )
        given.add_argument(
            "--hash",
            action="store_true",
            help=(
                "Read a password hash from stdin instead, alone on one line: Django's format, or Dovecot's "
                "{SCHEME}hash as doveadm pw prints it (replaced by argon2 at the first login)."
            ),
        )

    def handle(self, *args, address: str, password_stdin: bool, hash: bool, **options) -> None:
        if hash:
            with store_errors():
                mailbox = services.set_password_hash(Actor.cli(), address, read_password("password hash"))
        elif password_stdin:
            with store_errors():
                mailbox = services.set_password(Actor.cli(), address, read_password())
        else:
            raise CommandError(
                "pass --password-stdin and give the password on stdin "
                "(a password on the command line would show in ps and shell history)"
            )
        self.stdout.write(f"password changed for {mailbox.address}")
