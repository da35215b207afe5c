"""``deletemailbox ADDRESS``: remove a mailbox, its login and all its mail."""

import sys

from django.core.management.base import CommandError, CommandParser

from mailadmin.hosting import services
from mailadmin.hosting.actors import Actor
from mailadmin.management.commandutils import OperatorCommand, store_errors

YES = {"y", "yes"}


class Command(OperatorCommand):
    help = "Delete a mailbox, its login and all its messages."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("address", metavar="ADDRESS", help="Mailbox address.")
        parser.add_argument("--no-input", action="store_true", help="Delete without asking for confirmation.")

    def handle(self, *args, address: str, no_input: bool, **options) -> None:
        actor = Actor.cli()
        with store_errors():
            mailbox = services.get_mailbox(actor, address)
            if not no_input:
                self._confirm(mailbox.address, mailbox.used_messages)
            removed = services.delete_mailbox(actor, mailbox.address)
        self.stdout.write(f"deleted mailbox {mailbox.address} and {removed} messages")

    def _confirm(self, address: str, messages: int) -> None:
        if not sys.stdin.isatty():
            raise CommandError("stdin is not a terminal, so nobody can confirm: pass --no-input to delete")
        self.stdout.write(f"Delete mailbox {address} and its {messages} messages? [y/N] ", ending="")
        self.stdout.flush()
        if input().strip().lower() not in YES:
            raise CommandError("aborted: nothing deleted")
